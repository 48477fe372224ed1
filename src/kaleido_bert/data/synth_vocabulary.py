"""The synthetic catalogue's vocabulary: colours, trims, fits, hems, details, description phrases and the 24
sub-categories (:class:`Spec`: how each is drawn and which attribute values it varies). Read by the drawing
(:mod:`kaleido_bert.data.synth_drawing`) and the designer (:mod:`kaleido_bert.data.synth`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

Pt = tuple[float, float]
RGB = tuple[int, int, int]
SUPERSAMPLE = 2
JPEG_QUALITY = 92

COLOURS: dict[str, RGB] = {
    "black": (34, 34, 38), "navy": (32, 44, 88), "grey": (128, 130, 134), "beige": (212, 194, 158),
    "camel": (182, 136, 84), "red": (188, 36, 42), "burgundy": (112, 30, 48), "pink": (230, 146, 170),
    "mustard": (212, 164, 42), "olive": (108, 112, 52), "teal": (22, 118, 124), "lilac": (172, 146, 206)}
TRIMS: dict[str, RGB] = {"white": (248, 248, 244), "black": (24, 24, 26), "red": (204, 28, 36),
                         "yellow": (242, 202, 36), "green": (36, 142, 70), "blue": (36, 88, 196)}
ROLES: dict[str, RGB] = {"metal": (200, 200, 206), "inner": (236, 233, 226), "sole": (242, 241, 236),
                         "rubber": (44, 38, 34)}
FIT_SCALE = {"slim": 0.86, "relaxed": 1.0, "oversized": 1.18}
HEMS = {"upper": {"cropped": 0.56, "regular": 0.72, "long": 0.92},
        "skirt": {"short": 0.42, "knee": 0.62, "long": 0.92},
        "bottom": {"cropped": 0.8, "full": 0.97, "short": 0.4, "knee": 0.6}}
DETAILS = ("pocket", "buttons", "zip", "logo", "trim", "strap", "buckle")
STOP = {"cut", "fit", "length", "finish", "shape", "of", "the"}
"""Value words left out of an attribute's ``words`` (generic, or shared between attributes)."""
PHRASES: dict[str, dict[str, list[str]]] = {
    "length": {"cropped": ["a cropped length", "a cropped cut"], "regular": ["a regular length"],
               "long": ["a longline cut", "a longline length"], "full": ["a full length", "a full leg"],
               "short": ["a short length", "a short hem"], "knee": ["a knee length", "a knee-grazing hem"]},
    "pattern": {"solid": ["a solid colour", "a plain finish"], "stripes": ["bold stripes", "fine stripes"],
                "checks": ["a check pattern", "gingham checks"], "dots": ["polka dots", "tiny dots"],
                "print": ["an allover print", "a graphic print"]},
    "sleeves": {"long": ["long sleeves"], "short": ["short sleeves"], "sleeveless": ["a sleeveless shape"]},
    "neck": {"crew": ["a crew neck", "a ribbed crew neck"], "v-neck": ["a v-neck", "a deep v-neck"],
             "collar": ["a pointed collar", "a spread collar"], "hood": ["a drawstring hood", "a roomy hood"],
             "lapels": ["notch lapels", "sharp lapels"]},
    "pocket": {"upper": ["a chest pocket", "a breast pocket"], "hood": ["a kangaroo pocket"],
               "hip": ["flap pockets", "hip pockets"], "bottom": ["front pockets", "slant pockets"],
               "bag": ["a front pocket", "an outer pocket"]},
    "buttons": {"upper": ["a button placket", "tonal buttons"], "bottom": ["a button waist"],
                "skirt": ["a row of buttons", "decorative buttons"], "cap": ["a top button"]},
    "zip": {"upper": ["a full-length zip", "a front zip"], "bottom": ["a zip fly"], "boot": ["a side zip"],
            "bag": ["a zip top", "a zipped top"]},
    "logo": {"any": ["a logo patch", "a small logo patch", "a woven logo patch"]},
    "trim": {"any": ["{t} trim", "contrast {t} trim", "{t} trims"]},
    "strap": {"upper": ["a waist strap", "a tie strap"], "shoe": ["an ankle strap", "a hook-and-loop strap"],
              "bag": ["a shoulder strap", "a long strap"], "cap": ["an adjustable strap"],
              "clutch": ["a wrist strap"]},
    "buckle": {"any": ["a metal buckle", "a polished buckle", "a buckle"]}}
PHRASE_KEYS = {"sneaker": "shoe", "sandal": "shoe", "boot": "shoe", "tote": "bag", "backpack": "bag",
               "clutch": "bag", "skirt": "bottom"}
"""Fallback phrase table of a shape (a boot's strap reads like a shoe's, a skirt's zip like trousers')."""
PATTERN_ADJ = {"solid": "", "stripes": "striped", "checks": "checked", "dots": "dotted", "print": "printed"}
OPENERS = ["{Det} {adjs} {noun}.", "{Det} {adjs} {noun} {be} {praise}.", "Meet the {adjs} {noun}.",
           "Our {adjs} {noun} {be} {praise}.", "Here {be} {det} {adjs} {noun}."]
PRAISE = ["a wardrobe staple", "an easy everyday choice", "made for everyday wear", "built to last",
          "ready for the season", "a smart pick"]
CLAUSES = ["It has {x}.", "Features {x}.", "Finished with {x}.", "Designed with {x}.", "Look for {x}.",
           "{X} for a finishing touch.", "{X} to complete the look.", "Comes with {x}.",
           "Details include {x}."]
PATTERN_CLAUSES = ["The fabric shows {x}.", "Patterned with {x}.", "Finished in {x}.", "Made in {x}."]
FIT_CLAUSES = ["Cut for {x}.", "Tailored to {x}.", "It comes in {x}.", "Made with {x} in mind."]
PAIRS = ["Features {a} and {b}.", "It has {a} plus {b}.", "Designed with {a} and {b}.", "Expect {a} and {b}.",
         "With {a} and {b}."]
MARKETING = ["Perfect for weekends.", "Easy to style with denim.", "A versatile piece for every season.",
             "Made from soft cotton.", "Crafted from durable materials.", "Designed in our studio.",
             "Machine washable.", "Pair it with denim for a casual look.", "A modern take on a classic.",
             "Style it up or down.", "Ideal for travel and everyday wear.", "Layer it for cooler days."]


class Spec(NamedTuple):
    """How one sub-category is drawn (``shape``) and the attribute values it varies (space-separated)."""

    category: str
    noun: str
    shape: str
    fits: str = ""
    lengths: str = ""
    sleeves: str = ""
    necks: str = ""
    details: str = ""
    forced: str = ""
    plural: bool = False
    opts: dict[str, Any] = {}


F3, L3, SK, SL = "slim relaxed oversized", "cropped regular long", "short long", "short long sleeveless"
DRESS = "pocket buttons zip trim strap buckle"
SUBCATEGORIES: dict[str, Spec] = {
    "shirts": Spec("TOPS", "shirt", "upper", F3, L3, SK, "collar", "pocket logo trim", "buttons"),
    "t-shirts": Spec("TOPS", "t-shirt", "upper", F3, L3, SL, "crew v-neck", "pocket logo trim"),
    "sweaters": Spec("TOPS", "sweater", "upper", F3, L3, "long", "crew v-neck collar",
                     "logo trim buttons zip", opts={"rib": True}),
    "hoodies": Spec("TOPS", "hoodie", "upper", F3, L3, SK, "hood", "pocket zip logo trim",
                    opts={"pocket": "hood"}),
    "blouses": Spec("TOPS", "blouse", "upper", F3, L3, SL, "v-neck crew collar", "buttons trim pocket",
                    opts={"flare": 0.07}),
    "jeans": Spec("BOTTOMS", "jeans", "bottom", F3, "cropped full", details="pocket buttons zip logo trim",
                  plural=True, opts={"leg": 0.1, "gap": 0.025}),
    "trousers": Spec("BOTTOMS", "trousers", "bottom", F3, "cropped full", details="pocket buttons zip trim",
                     plural=True, opts={"leg": 0.15, "gap": 0.015, "crease": True}),
    "shorts": Spec("BOTTOMS", "shorts", "bottom", F3, "short knee", details="pocket buttons zip logo trim",
                   plural=True, opts={"leg": 0.17, "gap": 0.05}),
    "skirts": Spec("BOTTOMS", "skirt", "skirt", "slim relaxed", "short knee long",
                   details="pocket buttons zip trim"),
    "mini dresses": Spec("DRESSES", "mini dress", "upper", F3, "", SL, "crew v-neck", DRESS,
                         opts={"hem": 0.66, "dress": 0.11, "pocket": "hip"}),
    "maxi dresses": Spec("DRESSES", "maxi dress", "upper", F3, "", SL, "crew v-neck", DRESS,
                         opts={"hem": 0.98, "dress": 0.16, "pocket": "hip"}),
    "shirt dresses": Spec("DRESSES", "shirt dress", "upper", F3, "regular long", SK, "collar",
                          "pocket trim strap buckle", "buttons", opts={"dress": 0.03, "pocket": "hip"}),
    "coats": Spec("OUTERWEAR", "coat", "upper", F3, "regular long", "long", "lapels hood collar", DRESS,
                  opts={"pocket": "hip", "outer": True}),
    "jackets": Spec("OUTERWEAR", "jacket", "upper", F3, "cropped regular", SK, "collar hood crew",
                    "pocket zip buttons logo trim", opts={"pocket": "hip", "outer": True}),
    "blazers": Spec("OUTERWEAR", "blazer", "upper", F3, "regular long", "long", "lapels",
                    "pocket buttons trim", opts={"pocket": "hip", "outer": True}),
    "sneakers": Spec("SHOES", "sneakers", "sneaker", details="logo trim strap", plural=True),
    "boots": Spec("SHOES", "boots", "boot", details="zip strap buckle trim", plural=True),
    "sandals": Spec("SHOES", "sandals", "sandal", details="strap buckle trim", plural=True),
    "totes": Spec("BAGS", "tote bag", "tote", details="pocket zip logo trim strap"),
    "backpacks": Spec("BAGS", "backpack", "backpack", details="pocket zip logo buckle trim"),
    "clutches": Spec("BAGS", "clutch", "clutch", details="buckle strap zip logo"),
    "caps": Spec("ACCESSORIES", "cap", "cap", details="logo buttons strap buckle trim"),
    "belts": Spec("ACCESSORIES", "belt", "belt", details="trim logo", forced="buckle"),
    "scarves": Spec("ACCESSORIES", "scarf", "scarf", details="trim logo"),
}


