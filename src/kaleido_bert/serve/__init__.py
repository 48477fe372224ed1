"""Product search (beyond the paper): FAISS index, the in-process pipeline, the FastAPI service and page."""
