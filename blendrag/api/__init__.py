"""HTTP API and LangChain integration for blendrag.

``blendrag.api.app.create_app`` builds the FastAPI app (``blendrag serve`` runs it),
``blendrag.api.langchain`` holds the LangChain retriever and chat model. Nothing is imported
here, so ``blendrag --help`` does not pay for FastAPI.
"""
