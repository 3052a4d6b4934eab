"""fate-serve: an OpenAI-compatible HTTP server over one artifact (runtime/server.py)."""

from __future__ import annotations

import ipaddress
import socket
import sys

import click

from fate.artifacts import FateError
from fate.artifacts.budget import parse_budget
from fate.artifacts.errors import USER_ERRORS, exit_with

from .cli import ADVANCED_FLAGS, MEMORY_FLAGS, engine_options, load_engine
from .clihelp import command


@command("fate-serve", sections=(
    ("Server", ["host", "port", "model_name", "api_key", "cors_origins", "strict_model_name", "chat_template"]),
    ("Requests", ["max_queue", "request_timeout", "max_request_size", "conversation_cache"]),
    ("Memory", MEMORY_FLAGS),
    ("Advanced", ADVANCED_FLAGS),
), examples=(
    ("fate-serve qwen3-30b.fate --memory-limit 8GB", "OpenAI's API and a chat page on http://127.0.0.1:8080"),
    ("fate-serve qwen3-30b.fate --host 0.0.0.0 --api-key $KEY --cors-origin https://my.app",
     "for other machines and a web app: a key, and one allowed origin"),
))
@click.argument("artifact")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback unless you say otherwise).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="0: any free port (the one taken is printed).")
@click.option("--model-name", default=None, help="The model's id in the API (default: the artifact's folder name).")
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(min=0),
              help="Requests that may wait while one generates; more get 429 with Retry-After.")
@click.option("--request-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a request may take, waiting included.")
@click.option("--conversation-cache", default="256MB", show_default=True,
              help="Memory for the keys and values of recent sequences, so a follow-up chat turn prefills only "
                   "its new tokens (beside the expert budget; within --memory-limit); 0 turns it off.")
@click.option("--max-request-size", default="8MB", show_default=True,
              help="The largest request body taken; a larger one is answered 413 before it is read.")
@click.option("--strict-model-name", is_flag=True,
              help="Answer 404 to a request naming another model (by default one model is served whatever it names).")
@click.option("--api-key", default=None, envvar="FATE_API_KEY", show_envvar=True,
              help="A key every /v1 and /metrics request must send (Authorization: Bearer KEY).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="A browser origin allowed to call the API (http://localhost:3000, or * for any); repeatable. "
                   "Off unless given.")
@click.option("--chat-template", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="A Jinja chat template to use in place of the artifact's.")
@engine_options
def main(artifact: str, host: str, port: int, model_name: str | None, max_queue: int, request_timeout: float,
         conversation_cache: str, max_request_size: str, strict_model_name: bool, api_key: str | None,
         cors_origins: tuple[str, ...], chat_template: str | None, **engine_flags) -> None:
    """Serve a Fate ARTIFACT with OpenAI's HTTP API (completions, chat completions with tools and
    structured output, streaming) and a chat page at /."""
    try:
        try:
            import uvicorn

            from .server import Server, ServeConfig, configure_logging
        except ImportError as e:
            raise FateError(f"fate-serve needs the serve extra ({e.name} is missing): pip install 'fate[serve]'") \
                from None
        cache_bytes = 0 if conversation_cache.strip() == "0" else parse_budget(conversation_cache).bytes
        if cache_bytes is None:
            raise FateError("--conversation-cache takes bytes (256MB, 1GiB) or 0")
        body_bytes = parse_budget(max_request_size).bytes
        if not body_bytes:
            raise FateError("--max-request-size takes bytes (8MB, 64KiB)")
        if api_key is not None and not api_key.strip():
            raise FateError("--api-key is empty")
        listener = socket.create_server((host, port))
        engine = load_engine(artifact, **engine_flags, reserved=cache_bytes)
        if chat_template is not None:
            engine.codec.use_template(chat_template)
        name = model_name or engine.model.artifact.root.name.removesuffix(".fate")
        server = Server(engine, ServeConfig(name, max_queue, request_timeout, cache_bytes, body_bytes,
                                            strict_model_name, api_key, cors_origins))
    except USER_ERRORS as e:
        exit_with("fate-serve", e)
    except KeyboardInterrupt:
        click.echo("fate-serve: interrupted while starting", err=True)
        sys.exit(130)
    configure_logging()
    bound_host, bound_port = listener.getsockname()[:2]
    if api_key is None and not ipaddress.ip_address(bound_host).is_loopback:
        print(f"fate-serve: warning: listening on {bound_host}, beyond this machine, with no --api-key: anyone "
              "who can reach it may use it", file=sys.stderr, flush=True)
    print(f"fate-serve: {name} on http://{bound_host}:{bound_port}/v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(server.app, log_level="warning", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again: one line and 130, as fate-run
        click.echo("fate-serve: stopped", err=True)
        sys.exit(130)
    finally:
        server.close()
        engine.close()


if __name__ == "__main__":
    main()
