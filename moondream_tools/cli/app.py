"""The ``moondream-tools`` commands (click)."""

from __future__ import annotations

import asyncio
import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .._version import __version__
from .exports import EXPORTS, ExportSpec
from .inputs import collect_inputs, describe_search

__all__ = ["cli"]

_DEFAULT_MAX_OBJECTS = 250  # VisionTools' DEFAULT_MAX_OBJECTS (not imported: it pulls in the tools)
_DEFAULT_MAX_TILES = 16  # moondream_tools.tiling.DEFAULT_MAX_TILES


def _error(message: str, status: int = 2) -> None:
    """A user error: one line on stderr, then exit (never a traceback)."""
    click.echo(f"moondream-tools: error: {message}", err=True)
    sys.exit(status)


# ---------------------------------------------------------------- option types


class Tiles(click.ParamType):
    """``auto``, ``always``, ``never`` or a ``RxC`` grid (rows x columns, e.g. ``3x4``)."""

    name = "auto|always|never|RxC"

    def get_metavar(self, *args: Any, **kwargs: Any) -> str:
        return "auto|always|never|RxC"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        text = str(value).strip().lower()
        if text in ("auto", "always", "never"):
            return text
        match = re.fullmatch(r"(\d+)\s*[x*]\s*(\d+)", text)
        if match:
            rows, cols = int(match.group(1)), int(match.group(2))
            if rows >= 1 and cols >= 1:
                return (rows, cols)
        self.fail(f"{value!r} is not auto, always, never or a grid like 3x4 (rows x columns)", param, ctx)


def _tiles_text(tiling: Any) -> str:
    return f"{tiling[0]}x{tiling[1]}" if isinstance(tiling, tuple) else str(tiling)


def _max_tiles(tiling: Any, max_tiles: int) -> int:
    return max(max_tiles, tiling[0] * tiling[1]) if isinstance(tiling, tuple) else max_tiles


# ---------------------------------------------------------------- shared options


def _backend_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--backend", type=click.Choice(["moondream", "fal"]), default="moondream", show_default=True,
                     help="Moondream's API (Cloud, Station or any server speaking it) or Moondream 3 on fal.ai."),
        click.option("--base-url", metavar="URL",
                     help="The server (default: MOONDREAM_BASE_URL, else the backend's own)."),
        click.option("--model", help="The model to ask (Moondream servers; e.g. a finetune)."),
        click.option("--api-key-env", metavar="NAME",
                     help="The environment variable holding the key (default MOONDREAM_API_KEY / FAL_KEY)."),
        click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Requests (and inputs) in flight at once."),
        click.option("--rps", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="At most this many requests per second."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Seconds per request (default: the backend's)."),
        click.option("--max-retries", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Retries of a failed request."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--glob", "glob_pattern", metavar="PATTERN",
                     help="Which files of a directory: '*.png' matches names at any depth, 'sub/*.jpg' from the"
                          " directory (default: every image extension)."),
        click.option("--jsonl", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                     help="Append one JSON record per input to FILE; a rerun skips inputs already in it."),
        click.option("--retry-failed", is_flag=True, help="Redo the inputs whose last record in --jsonl is an error."),
        click.option("--annotate", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                     help="Write each image with its results drawn on it to DIR."),
        click.option("--coco", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                     help="Write the boxes (and masks) as a COCO detection JSON file."),
        click.option("--yolo", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                     help="Write a YOLO dataset (images/, labels/, data.yaml) to DIR."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary (failures are still listed)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _video_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--every", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
                     help="Videos: one frame every SECONDS (default: every frame)."),
        click.option("--keyframes", is_flag=True, help="Videos: only the keyframes (fast: nothing else is decoded)."),
        click.option("--max-frames", type=click.IntRange(min=1), default=None, metavar="N",
                     help="Videos: at most N frames each."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _batch_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--batch-api", is_flag=True,
                     help="Send the inputs as a Moondream Cloud Batch API job (half the price, results within"
                          " hours) and write the same records; needs --jsonl FILE (the job is kept in FILE.batch/)."),
        click.option("--no-wait", is_flag=True,
                     help="With --batch-api: submit, print the job directory and exit; 'moondream-tools batch"
                          " fetch JOB' writes the records once it is done."),
        click.option("--poll-interval", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                     metavar="SECONDS",
                     help="With --batch-api: the first wait between status polls (each wait 1.5x the last, up to 30 s)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _given(name: str) -> bool:
    """Whether the option was given (on the command line or by an environment variable)."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)


def _tile_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--tiles", "tiling", type=Tiles(), default="auto", show_default=True,
                     help="Large images: 'auto' tiles those the model would shrink more than 4x; or always, never,"
                          " or a grid RxC such as 3x4."),
        click.option("--max-tiles", type=click.IntRange(min=1), default=_DEFAULT_MAX_TILES, show_default=True,
                     help="The most tiles (requests) per image."),
        click.option("--max-objects", type=click.IntRange(min=1), default=_DEFAULT_MAX_OBJECTS, show_default=True,
                     help="The most objects asked for per request (tile)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


_INPUTS = click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")


# ---------------------------------------------------------------- building and running


def _backend(options: dict[str, Any]) -> Any:
    """The backend the options describe (a missing key: one line, exit 2)."""
    from pydantic import ValidationError

    from ..backend_config import BackendConfig
    from ..errors import ConfigurationError

    try:
        config = BackendConfig(
            backend=options["backend"], base_url=options["base_url"], model=options["model"],
            api_key_env=options["api_key_env"], max_concurrency=options["concurrency"],
            requests_per_second=options["rps"], timeout=options["timeout"], max_retries=options["max_retries"],
        )
        return config.build()
    except ConfigurationError as exc:  # the library's advice, less its Python-only part
        _error(re.sub(r" or pass \w+\(api_key=\.\.\.\)", "", str(exc)))
    except ValidationError as exc:
        _error("; ".join(str(e["msg"]) for e in exc.errors(include_url=False)))


def _sources(inputs: tuple[str, ...], glob: str | None, in_directories: set[str] | None = None) -> list[str]:
    """The inputs' sources; ``in_directories`` gets those only found under a directory."""
    try:
        sources, empty = collect_inputs(inputs, glob=glob, stdin=sys.stdin, in_directories=in_directories)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not sources:
        where = ", ".join(empty) or ", ".join(inputs)
        _error(f"no images found in {where} (searched for {describe_search(glob)})")
    for directory in empty:
        click.echo(f"moondream-tools: no images found in {directory}", err=True)
    return sources


def _check_exports(skill: str, options: dict[str, Any]) -> ExportSpec:
    spec = ExportSpec(annotate=options["annotate"], coco=options["coco"], yolo=options["yolo"])
    for name in ("annotate", "coco", "yolo"):
        if options[name] is not None and skill not in EXPORTS[name]:
            allowed = ", ".join(sorted(EXPORTS[name]))
            raise click.UsageError(f"--{name} is for {allowed}, not {skill}")
    if options["retry_failed"] and options["jsonl"] is None:
        raise click.UsageError("--retry-failed needs --jsonl FILE (the records to retry)")
    return spec


def _run(command: str, options: dict[str, Any], *, arguments: dict[str, Any], categories: list[str],
         asked: Any = None, index: Any = None, description: str) -> None:
    from .runner import Job, execute

    skill = "index" if asked is None else asked.skill
    if options.get("batch_api"):
        _run_batch(command, options, asked=asked, categories=categories, description=description)
        return
    for name in ("no_wait", "poll_interval"):
        if name in options and _given(name):
            raise click.UsageError(f"--{name.replace('_', '-')} is for --batch-api")
    spec = _check_exports(skill, options)
    in_directories: set[str] = set()
    sources = _sources(options["inputs"], options["glob_pattern"], in_directories)
    sources, videos, video = _videos(skill, options, sources, in_directories, spec)
    backend = _backend(options)
    if options["model"] is not None:
        arguments = {**arguments, "model": options["model"]}
    jsonl: Path | None = options["jsonl"]
    stdout_tty = sys.stdout.isatty()
    job = Job(
        command=command, arguments=arguments, sources=sources, backend=backend, concurrency=options["concurrency"],
        asked=asked, index=index, jsonl=jsonl, retry_failed=options["retry_failed"],
        records_to_stdout=jsonl is None and not stdout_tty, table=jsonl is None and stdout_tty,
        progress=sys.stderr.isatty(), quiet=options["quiet"], exports=spec, categories=categories,
        description=description, video=video, videos=videos,
    )
    try:
        status = asyncio.run(execute(job))
    except KeyboardInterrupt:  # only before the run's own handlers are in place
        status = 130
    sys.exit(status)


def _videos(
    skill: str, options: dict[str, Any], sources: list[str], in_directories: set[str], spec: ExportSpec
) -> tuple[list[str], frozenset[str], Any]:
    """``(sources, videos, sampling)``: the sources to run, the video inputs among them and
    how they are sampled (usage errors for what videos cannot do). Without the ``video``
    extra, a video named on the command line is a usage error; videos found in directories
    are left out, with a warning."""
    from .video import VIDEO_EXTRA, VideoOptions, looks_like_video, videos_supported

    every, keyframes, max_frames = options.get("every"), options.get("keyframes", False), options.get("max_frames")
    if every is not None and keyframes:
        raise click.UsageError("--every and --keyframes are two ways of sampling a video: give one")
    videos = frozenset(source for source in sources if looks_like_video(source))
    if videos and skill == "index":
        raise click.UsageError(f"index takes images, not videos ({sorted(videos)[0]}): run detect, caption, ... on videos")
    if videos and (spec.coco is not None or spec.yolo is not None):
        raise click.UsageError(
            f"--coco and --yolo export images, not videos ({sorted(videos)[0]}): use --jsonl (a record per frame)"
        )
    if videos and not videos_supported():
        named = [source for source in sources if source in videos and source not in in_directories]
        if named:
            raise click.UsageError(
                f"{named[0]} is a video: videos need the video extra (PyAV), which is not installed: {VIDEO_EXTRA}"
            )
        found = [source for source in sources if source in videos]
        click.echo(
            f"moondream-tools: warning: skipping {len(found)} video{'s' if len(found) > 1 else ''} found in"
            f" directories ({found[0]}{', ...' if len(found) > 1 else ''}): to include them, install the video"
            f" extra (PyAV): {VIDEO_EXTRA}",
            err=True,
        )
        sources = [source for source in sources if source not in videos]
        if not sources:
            _error(f"no images found in {', '.join(options['inputs'])} (only videos, which need: {VIDEO_EXTRA})")
        videos = frozenset()
    return sources, videos, VideoOptions(every=every, keyframes=keyframes, max_frames=max_frames)


def _run_batch(command: str, options: dict[str, Any], *, asked: Any, categories: list[str], description: str) -> None:
    """A skill command with --batch-api (see moondream_tools.cli.batch_api)."""
    skill = asked.skill
    if skill == "segment":
        raise click.UsageError(
            "the Batch API has no segment (only caption, query, detect, point and count): run segment without"
            " --batch-api"
        )
    if options["backend"] != "moondream":
        raise click.UsageError("--batch-api is Moondream Cloud's Batch API: not with --backend fal")
    if options["jsonl"] is None:
        raise click.UsageError("--batch-api needs --jsonl FILE (the records; the job is kept in FILE.batch/)")
    if skill in ("detect", "point", "count"):
        if options["tiling"] not in ("auto", "never"):
            raise click.UsageError(
                f"--tiles {_tiles_text(options['tiling'])} is not for --batch-api: the Batch API gets each image"
                " whole (as --tiles never); run without --batch-api to tile"
            )
        for name in ("max_tiles", "max_objects"):
            if _given(name):
                raise click.UsageError(
                    f"--{name.replace('_', '-')} is not for --batch-api: the Batch API gets each image whole and"
                    " takes no object limit"
                )
    spec = _check_exports(skill, options)
    if options["no_wait"] and spec.any:
        raise click.UsageError(
            "--annotate, --coco and --yolo need the results: without --no-wait, or rerun the command once"
            " 'moondream-tools batch fetch' has written them"
        )
    from .batch_api import BatchCommand, execute_batch
    from .video import looks_like_video

    sources = _sources(options["inputs"], options["glob_pattern"])
    for source in sources:
        if looks_like_video(source):
            raise click.UsageError(f"--batch-api sends images, not videos ({source}): run without --batch-api")
    for name in ("every", "keyframes", "max_frames"):
        if name in options and _given(name):
            raise click.UsageError(f"--{name.replace('_', '-')} is for videos, which --batch-api does not send")
    client = _backend(options)
    if skill == "caption":
        arguments: dict[str, Any] = {"length": asked.length}
        fields: dict[str, Any] = {"length": asked.length}
    elif skill == "query":
        arguments, fields = {"question": asked.question}, {"question": asked.question}
    else:
        arguments, fields = {"object": asked.object}, {"object": asked.object}
    arguments["batch"] = True
    if options["model"] is not None:
        arguments["model"] = options["model"]
    job = BatchCommand(
        command=command, skill=skill, arguments=arguments, fields=fields, sources=sources, client=client,
        jsonl=options["jsonl"], retry_failed=options["retry_failed"], concurrency=options["concurrency"],
        poll_interval=options["poll_interval"], wait=not options["no_wait"], progress=sys.stderr.isatty(),
        quiet=options["quiet"], exports=spec, categories=categories, description=description,
        tiling_note=skill in ("detect", "point", "count") and options["tiling"] == "auto",
        max_tiles=options.get("max_tiles") or _DEFAULT_MAX_TILES,
    )
    try:
        status = asyncio.run(execute_batch(job))
    except KeyboardInterrupt:  # only before the run's own handlers are in place
        status = 130
    sys.exit(status)


def _command(f: Callable[..., Any]) -> Callable[..., Any]:
    """Collect every option into one dict for the command body."""

    @functools.wraps(f)
    def wrapper(**options: Any) -> None:
        f(options)

    return wrapper


# ---------------------------------------------------------------- the commands


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="moondream-tools")
def cli() -> None:
    """Moondream vision skills over files, folders and URLs, as JSON Lines.

    \b
    The backend comes from the environment as in the library: MOONDREAM_API_KEY
    (Moondream Cloud) or MOONDREAM_BASE_URL (e.g. a Moondream Station at
    http://localhost:2020/v1); --backend fal reads FAL_KEY. Keys are never options.

    \b
    INPUT: image or video files, directories (searched recursively), http(s) URLs,
    or '-' for paths read from stdin, one per line. A video gives one record per
    sampled frame (--every, --keyframes, --max-frames) with track ids, then one
    for the video with its tracks; --annotate writes it annotated (DIR/NAME.annotated.mp4).
    """


@cli.command()
@click.option("--length", type=click.Choice(["short", "normal", "long"]), default="normal", show_default=True)
@_INPUTS
@_run_options
@_video_options
@_batch_options
@_backend_options
@_command
def caption(options: dict[str, Any]) -> None:
    """Describe each image."""
    from ..indexing.skills import Asked

    length = options["length"]
    _run("caption", options, arguments={"length": length}, categories=[],
         asked=Asked("caption", length=length), description=f"moondream-tools caption --length {length}")


@cli.command()
@click.argument("question")
@_INPUTS
@_run_options
@_video_options
@_batch_options
@_backend_options
@_command
def query(options: dict[str, Any]) -> None:
    """Answer QUESTION about each image."""
    from ..indexing.skills import Asked

    question = options["question"]
    if not question.strip():
        raise click.BadParameter("the question is empty", param_hint="QUESTION")
    _run("query", options, arguments={"question": question}, categories=[],
         asked=Asked("query", question=question), description=f"moondream-tools query {question!r}")


def _object_command(skill: str, doc: str, tiles: bool) -> None:
    def body(options: dict[str, Any]) -> None:
        from ..indexing.skills import Asked

        phrase = options["object"]
        if not phrase.strip():
            raise click.BadParameter("the object phrase is empty", param_hint="OBJECT")
        if tiles:
            tiling, max_tiles = options["tiling"], _max_tiles(options["tiling"], options["max_tiles"])
            arguments = {"object": phrase, "tiles": _tiles_text(tiling), "max_tiles": max_tiles,
                         "max_objects": options["max_objects"]}
            asked = Asked(skill, object=phrase, tiling=tiling, max_tiles=max_tiles,  # type: ignore[arg-type]
                          max_objects=options["max_objects"])
        else:
            arguments, asked = {"object": phrase}, Asked(skill, object=phrase)  # type: ignore[arg-type]
        _run(skill, options, arguments=arguments, categories=[phrase], asked=asked,
             description=f"moondream-tools {skill} {phrase!r}")

    body.__doc__ = doc
    body.__name__ = skill
    command = _command(body)
    command = _backend_options(command)
    command = _batch_options(command)
    command = _video_options(command)
    command = _run_options(command)
    if tiles:
        command = _tile_options(command)
    command = _INPUTS(command)
    command = click.argument("object")(command)
    cli.command(name=skill)(command)


_object_command("detect", "Boxes of every OBJECT in each image (phrase first, then inputs, like grep).", True)
_object_command("point", "A point on every OBJECT in each image.", True)
_object_command("count", "How many OBJECTs each image holds (counted with points; large images tiled).", True)
_object_command("segment", "The mask of OBJECT in each image.", False)


@cli.command()
@click.option("--question", "questions", multiple=True, metavar="TEXT", help="A question asked of every image (repeatable).")
@click.option("--ocr", is_flag=True, help="Transcribe the text in each image.")
@click.option("--detect", "detect", multiple=True, metavar="OBJECT", help="Count and box OBJECT (repeatable).")
@click.option("--caption-length", type=click.Choice(["short", "normal", "long"]), default="normal", show_default=True)
@click.option("--no-caption", is_flag=True, help="Do not caption.")
@_tile_options
@_INPUTS
@_run_options
@_backend_options
@_command
def index(options: dict[str, Any]) -> None:
    """Index images for retrieval: caption, answers, text and objects per image."""
    from .runner import IndexOptions

    questions = tuple(dict.fromkeys(q for q in options["questions"]))
    detect = tuple(dict.fromkeys(options["detect"]))
    if any(not q.strip() for q in questions) or any(not d.strip() for d in detect):
        raise click.UsageError("--question and --detect take non-empty text")
    if options["no_caption"] and not (questions or detect or options["ocr"]):
        raise click.UsageError("nothing to index: --no-caption without --question, --ocr or --detect")
    if not detect and any(options[name] is not None for name in ("annotate", "coco", "yolo")):
        raise click.UsageError("--annotate, --coco and --yolo draw the --detect phrases: give at least one --detect")
    tiling, max_tiles = options["tiling"], _max_tiles(options["tiling"], options["max_tiles"])
    caption_length = None if options["no_caption"] else options["caption_length"]
    arguments = {
        "caption": caption_length, "questions": list(questions), "ocr": options["ocr"], "detect": list(detect),
        "tiles": _tiles_text(tiling), "max_tiles": max_tiles, "max_objects": options["max_objects"],
    }
    spec = IndexOptions(
        caption=caption_length is not None, caption_length=options["caption_length"], questions=questions,
        ocr=options["ocr"], detect=detect, tiling=tiling, max_tiles=max_tiles, max_objects=options["max_objects"],
    )
    _run("index", options, arguments=arguments, categories=list(detect), index=spec,
         description="moondream-tools index")


@cli.command()
@click.option("--allow-dir", "allow_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              metavar="DIR", help="A directory whose images the agent may name by path (repeatable).")
@click.option("--allow-urls", is_flag=True, help="Let the agent name public http(s) image URLs.")
@click.option("--return-images", is_flag=True, help="Return annotated images with the tools' results.")
@click.option("--image-store", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Keep the images the agent sends in DIR (handles survive restarts).")
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (http).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port (http).")
@_backend_options
@_command
def mcp(options: dict[str, Any]) -> None:
    """Serve the vision tools to an agent over MCP (Model Context Protocol)."""
    import importlib

    try:
        importlib.import_module("mcp")
    except ImportError:
        _error('the mcp command needs the MCP SDK: pip install "moondream-tools[mcp]"')
    try:
        from ..mcp_server import run_server
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "mcp":
            _error(f'the mcp command needs the MCP SDK ({exc}): pip install "moondream-tools[mcp]"')
        if exc.name == "moondream_tools.mcp_server":
            _error("this installation of moondream-tools has no MCP server (moondream_tools.mcp_server)")
        raise
    from ..errors import ConfigurationError
    from ..image_store import ImageStore
    from ..policy import ImagePolicy
    from ..tools import VisionTools

    backend = _backend(options)
    try:
        store = ImageStore(options["image_store"]) if options["image_store"] is not None else None
    except ConfigurationError as exc:
        _error(str(exc))
    policy = ImagePolicy(allowed_dirs=list(options["allow_dirs"]), allow_urls=options["allow_urls"])
    vision = VisionTools(backend, image_policy=policy, image_store=store, return_images=options["return_images"])
    try:
        run_server(
            vision, transport=options["transport"], host=options["host"], port=options["port"],
            return_images=options["return_images"],
        )
    finally:
        # The tools close only a backend they built; this one is the command's.
        asyncio.run(backend.aclose())
        if store is not None:
            store.close()


# ---------------------------------------------------------------- batch jobs


def _job_backend_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--base-url", metavar="URL", help="The server (default: the one the job was submitted to)."),
        click.option("--api-key-env", metavar="NAME",
                     help="The environment variable holding the key (default MOONDREAM_API_KEY)."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Seconds per request (default: the client's)."),
        click.option("--max-retries", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Retries of a failed request."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _job_client_factory(options: dict[str, Any]) -> Callable[[str | None], Any]:
    """Builds the client of a job: ``--base-url``, else the server the job was submitted to."""

    def make(recorded_url: str | None) -> Any:
        return _backend({
            "backend": "moondream", "base_url": options["base_url"] or recorded_url, "model": None,
            "api_key_env": options["api_key_env"], "concurrency": 8, "rps": None, "timeout": options["timeout"],
            "max_retries": options["max_retries"],
        })

    return make


def _job_paths(jobs: tuple[Path, ...]) -> list[Path]:
    from ..errors import ConfigurationError
    from .batch_api import resolve_jobs

    paths: list[Path] = []
    for job in jobs:
        try:
            paths.extend(p for p in resolve_jobs(job) if p not in paths)
        except ConfigurationError as exc:
            _error(str(exc))
    return paths


_JOBS = click.argument("jobs", nargs=-1, required=True, metavar="JOB...",
                       type=click.Path(exists=True, file_okay=False, path_type=Path))


@cli.group()
def batch() -> None:
    """Batch API jobs of --batch-api commands: status and fetch.

    \b
    JOB: a job directory (printed by --no-wait, e.g. captions.jsonl.batch/0001-caption),
    or FILE.batch for every job of the records file FILE.
    """


@batch.command(name="status")
@_JOBS
@_job_backend_options
@_command
def batch_status(options: dict[str, Any]) -> None:
    """Poll each JOB once and print where it stands (never writes records)."""
    from .batch_api import status_jobs

    paths = _job_paths(options["jobs"])
    sys.exit(asyncio.run(status_jobs(paths, _job_client_factory(options))))


@batch.command(name="fetch")
@_JOBS
@click.option("--jsonl", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Append the records to FILE (default: the --jsonl of the command that made the job).")
@click.option("--quiet", "-q", is_flag=True, help="No summary (failures are still listed).")
@_job_backend_options
@_command
def batch_fetch(options: dict[str, Any]) -> None:
    """Write the records of each finished JOB (never waits: exit 1 when one is not finished,
    failed or expired). Records already in the file are not written again."""
    from .batch_api import fetch_jobs

    paths = _job_paths(options["jobs"])
    if len(paths) > 1:  # FILE.batch: the jobs not fetched yet
        from .batch_api import load_job

        paths = [p for p in paths if not load_job(p).written] or paths[-1:]
    sys.exit(asyncio.run(fetch_jobs(paths, options["jsonl"], _job_client_factory(options), quiet=options["quiet"])))
