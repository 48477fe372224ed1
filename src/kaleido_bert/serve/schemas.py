"""The product-search API's response models: what each endpoint of :mod:`kaleido_bert.serve.app` answers with.

Pydantic models, so FastAPI validates every response and the OpenAPI schema (``/openapi.json``) documents each
field, including what a result's ``score`` means (:data:`PRODUCT_SCORE`, :data:`DESCRIPTION_SCORE`).
Request models live with their endpoints in :func:`kaleido_bert.serve.app.create_app` (they depend on its limits).
"""

from pydantic import BaseModel, ConfigDict, Field

PRODUCT_SCORE = (
    "higher is better; comparable only within one response. Text search without re-ranking: the dual encoder's "
    "cosine of the query and the image, in [-1, 1]; when the index holds a query bank, that cosine minus the "
    "image's query-bank offset (inverted-softmax normalisation), which can fall outside [-1, 1]. Text search "
    "re-ranked (rerank, on a model with an ITM head): the ITM logit, unbounded (with eval.pair_score = itm+itc: "
    "the ITM log-odds plus the ITC logit). Image search: the cosine of the two images' embeddings, in [-1, 1].")
"""What a search result's ``score`` is (the OpenAPI schema's description of the field)."""
DESCRIPTION_SCORE = (
    "higher is better; comparable only within one response. On a model with an ITM head: the ITM logit of the "
    "photo and the description, unbounded (with eval.pair_score = itm+itc: the ITM log-odds plus the ITC "
    "logit); otherwise the dual encoder's cosine in [-1, 1], minus the description's query-bank offset when the "
    "index holds a query bank.")
"""What a matching description's ``score`` is."""


class Product(BaseModel):
    """One search result: a catalogue image of a product with its texts, labels and score."""

    id: str = Field(description="catalogue item (image) id")
    product_id: str
    title: str
    description: str
    category: str
    subcategory: str
    score: float = Field(description=PRODUCT_SCORE)
    image: str = Field(description="image path relative to the catalogue root")
    image_url: str = Field(description="where this service serves the image (/images/...)")


class TextSearchResponse(BaseModel):
    query: str
    k: int
    category: str | None
    reranked: bool = Field(description="whether the cross-encoder re-scored the results: asked for (rerank) and the "
                                       "model's own choice on validation (it re-ranks only where that beat its dual "
                                       "encoder; /healthz: rerank_choice)")
    results: list[Product]


class DescriptionHit(BaseModel):
    """One catalogue product whose description matches the uploaded photo."""

    product_id: str
    title: str = Field(description="the product's title in the catalogue")
    description: str = Field(description="the product's description in the catalogue")
    score: float = Field(description=DESCRIPTION_SCORE)


class ImageSearchResponse(BaseModel):
    products: list[Product]
    descriptions: list[DescriptionHit] = Field(description="catalogue descriptions that best match the image")


class CaptionResponse(BaseModel):
    caption: str


class LabelProb(BaseModel):
    label: str
    prob: float = Field(ge=0.0, le=1.0)


class LabelScore(BaseModel):
    label: str
    score: float = Field(ge=-1.0, le=1.0, description="cosine of the photo and the label's prompt")
    prob: float | None = Field(ge=0.0, le=1.0, description="softmax over the given labels with the model's ITC "
                                                         "logit scale (null without an ITC head)")


class ClassifyResponse(BaseModel):
    category: list[LabelProb] = Field(description="top categories, most likely first (empty when labels were given "
                                                  "and the run has no trained classifier)")
    subcategory: list[LabelProb] = Field(description="top sub-categories, most likely first (likewise)")
    zero_shot: list[LabelScore] | None = Field(None, description="the given labels ranked zero-shot, best first "
                                                                 "(null without labels)")


class CategoriesResponse(BaseModel):
    categories: list[str]


class HealthResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str = Field(description="'ok' when the service answers; the pipeline's facts follow")


class ErrorResponse(BaseModel):
    detail: str = Field(description="one line saying what was wrong with the request")
