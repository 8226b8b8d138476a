"""LangChain integration: in-process and against a live server, plus langchain-tests' standard suites."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.documents import Document
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnablePassthrough
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from blendrag.api.app import create_app
from blendrag.api.langchain import BlendRAGRetriever, ChatBlendRAG, blend_prompt
from tests.test_api_server import ServerThread

# The standard suites' async tests carry no marker and pytest-asyncio runs in strict mode (the
# project's pytest options are not ours to change), so their classes are marked as a whole; the
# mark is a no-op on their sync tests, which pytest-asyncio would otherwise warn about.
ASYNC_SUITE = [
    pytest.mark.asyncio,
    pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'"),
]

QUESTION = "Who kept the Saint Orvo lighthouse?"
DOCS = ["The Zephyr zeppelin is moored at Quarry Hill.", "Barn owls nest in the old mill."]


@pytest.fixture(scope="module")
def index_dir(new_sample_index) -> Path:
    return new_sample_index("lc-index")


@pytest.fixture(scope="module")
def server(index_dir, tiny_engine) -> str:
    with ServerThread(create_app(tiny_engine, index_dir)) as running:
        yield running.url


@pytest.fixture(params=["local", "remote"])
def backend(request, index_dir, tiny_engine) -> dict:
    """Constructor arguments of (retriever, chat model) for one backend."""
    if request.param == "local":
        return {"retriever": {"index_dir": str(index_dir)}, "chat": {"engine": tiny_engine}}
    url = request.getfixturevalue("server")
    return {"retriever": {"base_url": url}, "chat": {"base_url": url}}


def test_retriever_documents_carry_ids_and_scores(backend):
    retriever = BlendRAGRetriever(k=3, **backend["retriever"])
    docs = retriever.invoke(QUESTION)
    assert len(docs) == 3 and docs[0].metadata["doc_id"] == "saint_orvo_lighthouse.md"
    assert all(isinstance(d.metadata["chunk_id"], int) for d in docs)
    assert [d.metadata["score"] for d in docs] == sorted((d.metadata["score"] for d in docs), reverse=True)
    assert len(retriever.invoke(QUESTION, k=1)) == 1


@pytest.mark.asyncio
async def test_retriever_async_matches_sync(backend):
    retriever = BlendRAGRetriever(k=2, **backend["retriever"])
    assert await retriever.ainvoke(QUESTION) == retriever.invoke(QUESTION)


def test_retriever_needs_one_source(index_dir):
    with pytest.raises(ValueError, match="exactly one"):
        BlendRAGRetriever()
    with pytest.raises(ValueError, match="exactly one"):
        BlendRAGRetriever(index_dir=str(index_dir), base_url="http://127.0.0.1:1")


def test_chat_blends_given_documents(backend):
    chat = ChatBlendRAG(max_tokens=4, **backend["chat"])
    out = chat.invoke("Where is the zeppelin?", documents=[Document(page_content=DOCS[0]), DOCS[1]])
    assert out.content and out.usage_metadata["output_tokens"] == 4
    assert [c["text"] for c in out.response_metadata["chunks"]] == DOCS
    stats = out.response_metadata["stats"]
    assert stats["n_tokens"] == out.usage_metadata["input_tokens"] and stats["ttft_s"] > 0


def test_chat_in_an_lcel_chain_streams(backend):
    retriever = BlendRAGRetriever(k=2, **backend["retriever"])
    chat = ChatBlendRAG(max_tokens=5, **backend["chat"])
    chain = {"documents": retriever, "question": RunnablePassthrough()} | blend_prompt | chat
    whole = chain.invoke(QUESTION)
    pieces = list(chain.stream(QUESTION))
    assert len(pieces) > 1 and "".join(p.content for p in pieces) == whole.content
    merged = pieces[0]
    for piece in pieces[1:]:
        merged += piece
    assert merged.usage_metadata == whole.usage_metadata
    chunks = whole.response_metadata["chunks"]
    assert [c["text"] for c in chunks] == [d.page_content for d in retriever.invoke(QUESTION)]


def test_chat_own_retrieval(backend, index_dir):
    retriever = BlendRAGRetriever(index_dir=str(index_dir), k=2)
    chat = ChatBlendRAG(max_tokens=3, retriever=retriever, **backend["chat"])
    out = chat.invoke([HumanMessage(QUESTION)])
    assert out.response_metadata["chunks"][0]["text"] == retriever.invoke(QUESTION)[0].page_content


def test_remote_chat_retrieves_on_the_server(server):
    out = ChatBlendRAG(base_url=server, max_tokens=3, top_k=2).invoke(QUESTION)
    assert [c["doc_id"] for c in out.response_metadata["chunks"]][0] == "saint_orvo_lighthouse.md"


def test_chat_needs_a_question(tiny_engine):
    with pytest.raises(ValueError, match="human message"):
        ChatBlendRAG(engine=tiny_engine).invoke([])


class TestChatBlendRAGUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatBlendRAG]:
        return ChatBlendRAG

    @property
    def chat_model_params(self) -> dict:
        return {"base_url": "http://127.0.0.1:9", "model": "tiny"}


class TestChatBlendRAGIntegration(ChatModelIntegrationTests):
    """In-process on the tiny random-weight model: answers are noise, but the protocol is real."""

    pytestmark = ASYNC_SUITE

    @pytest.fixture(autouse=True)
    def _engine(self, tiny_engine) -> None:
        type(self).engine = tiny_engine

    @property
    def chat_model_class(self) -> type[ChatBlendRAG]:
        return ChatBlendRAG

    @property
    def chat_model_params(self) -> dict:
        return {"engine": self.engine, "max_tokens": 8}

    @property
    def supports_model_override(self) -> bool:
        return False  # one engine, one model


class TestBlendRAGRetrieverIntegration(RetrieversIntegrationTests):
    pytestmark = ASYNC_SUITE

    @pytest.fixture(autouse=True)
    def _index(self, index_dir) -> None:
        type(self).index_dir = index_dir

    @property
    def retriever_constructor(self) -> type[BlendRAGRetriever]:
        return BlendRAGRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"index_dir": str(self.index_dir)}

    @property
    def retriever_query_example(self) -> str:
        return QUESTION
