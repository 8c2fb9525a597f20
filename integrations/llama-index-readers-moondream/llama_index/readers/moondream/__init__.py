"""LlamaIndex reader for Moondream vision: images into searchable ``ImageDocument`` s.

Each image becomes one ``ImageDocument`` whose text is what Moondream saw (a caption, the
answers to your questions, the text in the image, the objects found and their counts), with
flat metadata any vector store accepts (``count_<phrase>``, ``boxes_<phrase>`` in pixels,
``width``, ``height``, ``errors``, ...) and its id the sha256 of the image's bytes.

Example::

    from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
    from llama_index.readers.moondream import MoondreamImageReader

    reader = MoondreamImageReader(detect=["person"], cache=".moondream-cache")
    docs = SimpleDirectoryReader(          # MOONDREAM_API_KEY / MOONDREAM_BASE_URL
        "photos/", file_extractor={".jpg": reader, ".png": reader}
    ).load_data()
    retriever = VectorStoreIndex.from_documents(docs).as_retriever()
    print(retriever.retrieve("two people on a bench")[0].metadata["file_path"])
"""

from llama_index.readers.moondream.base import MoondreamImageReader

__all__ = ["MoondreamImageReader"]
