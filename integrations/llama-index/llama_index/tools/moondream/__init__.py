"""LlamaIndex tools for Moondream vision: describe, count, locate and segment images.

Example::

    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.tools.moondream import MoondreamToolSpec

    spec = MoondreamToolSpec()                      # MOONDREAM_API_KEY / MOONDREAM_BASE_URL
    spec.add_image("street.jpg", name="street")
    agent = FunctionAgent(tools=spec.to_tool_list(), llm=llm)
    print(await agent.run("How many people are in the image 'street'?"))
"""

from llama_index.tools.moondream.base import MoondreamToolSpec

__all__ = ["MoondreamToolSpec"]
