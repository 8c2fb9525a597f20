"""The Moondream Batch API: many requests at half price, results within hours, resumable.

:class:`MoondreamBatch` turns requests (an image and a skill: caption, query, detect or point)
into the Batch API's JSONL input, uploads it in parts, submits it, polls, downloads the result
files and yields one :class:`BatchResult` per request, matched back by id, in the same result
types as the standard API (with ``image_size`` set, so ``to_pixels()`` works). Every step is
recorded in the job's directory, so a job killed at any point resumes without uploading a
part or submitting a batch twice. It runs on the same transport as :class:`AsyncMoondream`
(auth, retries, limits, redaction).

Modules: :mod:`._wire` (the file formats and prices, pure), :mod:`._state` (the job
directory's files), :mod:`._job` (the job).

Example::

    from moondream_tools import MoondreamBatch

    async with MoondreamBatch("jobs/street") as job:
        job.add_many("photos/", "detect", object="car")
        async for item in job.run(on_progress=lambda p: print(p.status, p.completed, "/", p.total)):
            if item.ok:
                print(item.source, len(item.result.objects), "cars")
            else:
                print(item.source, "failed:", item.error.code)
        print("cost (batch, standard):", job.cost())
"""

from ..errors import BatchError, BatchExpiredError, BatchFailedError, BatchItemError
from ._job import BatchInfo, BatchProgress, MoondreamBatch
from ._wire import BATCH_SKILLS, BatchResult, estimate_cost

__all__ = [
    "BATCH_SKILLS",
    "BatchError",
    "BatchExpiredError",
    "BatchFailedError",
    "BatchInfo",
    "BatchItemError",
    "BatchProgress",
    "BatchResult",
    "MoondreamBatch",
    "estimate_cost",
]
