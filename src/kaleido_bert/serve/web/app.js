// The kaleido-bert product-search page: text search, image upload (search, caption, classify), error display.
// Plain browser JavaScript, no build step. All text from the API is inserted with textContent, never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("search-form"),
    query: $("query"),
    k: $("k"),
    category: $("category"),
    button: $("search-button"),
    results: $("results"),
    dropZone: $("drop-zone"),
    fileInput: $("file-input"),
    preview: $("preview"),
    caption: $("caption"),
    classification: $("classification"),
    descriptions: $("descriptions"),
    error: $("error"),
    status: $("status"),
  };
  let generation = 0; // each new search bumps it; answers of older searches are dropped
  let previewUrl = null;

  // ------------------------------------------------------------------ messages

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
  }

  function clearError() {
    els.error.textContent = "";
    els.error.hidden = true;
  }

  function setStatus(message) {
    els.status.textContent = message;
  }

  // FastAPI answers {"detail": "..."} for our errors and {"detail": [{loc, msg}, ...]} for validation errors.
  function describeError(body, response) {
    const detail = body && body.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail
        .map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".") || "request"}: ${e.msg}`)
        .join("; ");
    }
    return `request failed: HTTP ${response.status} ${response.statusText}`.trim();
  }

  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, options);
    } catch (err) {
      throw new Error(`cannot reach the server (${err.message})`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) throw new Error(describeError(body, response));
    if (body === null) throw new Error(`the server sent an unreadable answer to ${path}`);
    return { body, ms: response.headers.get("X-Latency-ms") };
  }

  // ------------------------------------------------------------------ rendering

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function renderResults(products) {
    els.results.replaceChildren();
    for (const p of products) {
      const card = element("article", "result");
      card.dataset.id = p.id;
      const img = element("img");
      img.src = p.image_url;
      img.alt = p.title;
      img.width = 160;
      img.height = 160;
      card.append(
        img,
        element("h3", "title", p.title),
        element("p", "labels", `${p.category} / ${p.subcategory}`),
        element("p", "score", `score ${Number(p.score).toFixed(3)}`),
      );
      card.title = p.description;
      els.results.append(card);
    }
    if (!products.length) els.results.append(element("p", "empty", "No matching products."));
  }

  function renderLabels(title, labels) {
    const group = element("div", "label-group");
    group.append(element("h4", "", title));
    if (!labels.length) return group;
    const [top, ...rest] = labels;
    const best = element("p", "top-label");
    best.append(element("span", "label", top.label), element("span", "prob", percent(top.prob)));
    group.append(best);
    const list = element("ul", "other-labels");
    for (const l of rest) {
      const item = element("li");
      const bar = element("span", "bar");
      bar.style.width = `${Math.round(l.prob * 100)}%`;
      item.append(element("span", "label", l.label), element("span", "prob", percent(l.prob)), bar);
      list.append(item);
    }
    group.append(list);
    return group;
  }

  function percent(p) {
    return `${(Number(p) * 100).toFixed(1)}%`;
  }

  function renderClassification(result) {
    els.classification.replaceChildren(
      renderLabels("Category", result.category || []),
      renderLabels("Sub-category", result.subcategory || []),
    );
  }

  function renderDescriptions(descriptions) {
    els.descriptions.replaceChildren();
    for (const d of descriptions) {
      const item = element("li");
      item.title = d.description;
      item.append(
        element("span", "description", d.description),
        element("span", "score", `score ${Number(d.score).toFixed(3)}`),
      );
      els.descriptions.append(item);
    }
  }

  function clearImageAnalysis() {
    els.caption.textContent = "";
    els.classification.replaceChildren();
    els.descriptions.replaceChildren();
  }

  // ------------------------------------------------------------------ text search

  async function loadCategories() {
    try {
      const { body } = await api("/api/categories");
      for (const name of body.categories) {
        const option = element("option", "", name);
        option.value = name;
        els.category.append(option);
      }
    } catch (err) {
      showError(`Could not load the categories: ${err.message}`);
    }
  }

  async function searchText(event) {
    event.preventDefault();
    const query = els.query.value.trim();
    if (!query) {
      showError("Type a description to search for.");
      els.query.focus();
      return;
    }
    const mine = ++generation;
    clearError();
    setStatus("Searching…");
    els.button.disabled = true;
    try {
      const payload = { query, k: Number(els.k.value), category: els.category.value || null };
      const { body, ms } = await api("/api/search/text", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(payload),
      });
      if (mine !== generation) return;
      renderResults(body.results);
      setStatus(`${body.results.length} results for “${body.query}”${ms ? ` in ${Math.round(ms)} ms` : ""}.`);
    } catch (err) {
      if (mine !== generation) return;
      showError(err.message);
      setStatus("");
    } finally {
      els.button.disabled = false;
    }
  }

  // ------------------------------------------------------------------ image upload

  function upload(path, file, fields = {}) {
    const form = new FormData();
    form.append("file", file, file.name || "upload");
    for (const [key, value] of Object.entries(fields)) form.append(key, value);
    return api(path, { method: "POST", body: form });
  }

  async function searchImage(file) {
    if (!file) return;
    const mine = ++generation;
    clearError();
    clearImageAnalysis();
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    els.preview.src = previewUrl;
    els.preview.hidden = false;
    setStatus(`Analysing ${file.name || "the image"}…`);

    const errors = [];
    const fail = (what) => (err) => {
      if (mine === generation) errors.push(`${what}: ${err.message}`);
    };
    const tasks = [
      upload("/api/search/image", file, { k: els.k.value }).then(({ body }) => {
        if (mine !== generation) return;
        renderResults(body.products);
        renderDescriptions(body.descriptions);
      }, fail("Image search")),
      upload("/api/caption", file).then(({ body }) => {
        if (mine === generation) els.caption.textContent = body.caption;
      }, fail("Caption")),
      upload("/api/classify", file).then(({ body }) => {
        if (mine === generation) renderClassification(body);
      }, fail("Classification")),
    ];
    await Promise.all(tasks);
    if (mine !== generation) return;
    if (errors.length) {
      // The three calls usually fail for the same reason (the upload itself): say it once.
      const unique = [...new Set(errors.map((e) => e.replace(/^[^:]+: /, "")))];
      showError(unique.length === 1 ? unique[0] : errors.join("\n"));
      setStatus("");
    } else {
      setStatus(`Showing products similar to ${file.name || "the image"}.`);
    }
  }

  function onDrop(event) {
    event.preventDefault();
    els.dropZone.classList.remove("dragging");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) searchImage(file);
  }

  // ------------------------------------------------------------------ wiring

  els.form.addEventListener("submit", searchText);
  els.fileInput.addEventListener("change", () => {
    searchImage(els.fileInput.files[0]);
    els.fileInput.value = ""; // choosing the same file again still triggers a search
  });
  for (const name of ["dragenter", "dragover"]) {
    els.dropZone.addEventListener(name, (event) => {
      event.preventDefault();
      els.dropZone.classList.add("dragging");
    });
  }
  els.dropZone.addEventListener("dragleave", () => els.dropZone.classList.remove("dragging"));
  els.dropZone.addEventListener("drop", onDrop);
  els.dropZone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      els.fileInput.click();
    }
  });
  loadCategories();
})();
