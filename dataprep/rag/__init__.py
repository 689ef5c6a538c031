"""Pure logic of the retrieval (RAG) stage: chunking, embedding, vector and BM25 indexes, prompts, evaluation.

Nothing here imports Ray or Prefect; the stage's actors, flow and Serve endpoints wrap these modules.
"""
