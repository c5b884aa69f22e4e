"""Retrieval: sentence embeddings, exact nearest neighbours, demonstrations in prompts, and the
hybrid's index (versioned with the dataset, shipped with the adapter)."""

from tuneline.retrieval.hybrid import (
    RetrievalIndex,
    Retriever,
    adapter_retriever,
    build_index,
    index_folder,
    load_index,
    query_of,
)
from tuneline.retrieval.index import (
    NearestIndex,
    retrieval_prompts,
    with_demonstrations,
    with_label_set,
)

__all__ = ["NearestIndex", "RetrievalIndex", "Retriever", "adapter_retriever", "build_index", "index_folder",
           "load_index", "query_of", "retrieval_prompts", "with_demonstrations", "with_label_set"]
