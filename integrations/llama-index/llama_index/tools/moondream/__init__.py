"""LlamaIndex tools for Moondream vision: describe, count, locate and segment images.

Example::

    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.tools.moondream import MoondreamToolSpec

    spec = MoondreamToolSpec()                      # MOONDREAM_API_KEY / MOONDREAM_BASE_URL
    spec.add_image("street.jpg", name="street")
    agent = FunctionAgent(tools=spec.to_tool_list(), llm=llm)
    print(await agent.run("How many people are in the image 'street'?"))

    # images the user sent (ImageBlocks) -> "[image img_3fa2c1d0: 1280x853 px]" handles
    user_msg = await spec.aattach(user_msg)
    print(await agent.run(user_msg=user_msg))

The same rewriting over any ``moondream_tools.VisionTools`` (e.g. one shared with the
LangChain adapter): ``llama_index.tools.moondream.attachments.aattach_message``.
"""

from llama_index.tools.moondream.base import MoondreamToolSpec

__all__ = ["MoondreamToolSpec"]
