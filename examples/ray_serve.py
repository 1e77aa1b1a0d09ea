"""Ray Serve LLM: an OpenAI-compatible PruMerge server whose replicas Ray places on any machine.

Builds `ray.serve.llm.build_openai_app` from one `ray.serve.llm.LLMConfig` whose
`engine_kwargs` are `vllm_prumerge.engine_kwargs(mode)` plus the usual vLLM settings; each
replica runs vLLM with the plugin (it loads itself through its entry point), and Ray Serve's
ingress routes OpenAI requests (`/v1/chat/completions`, `/v1/models`) to the replicas. Clients
are the same as for `vllm serve --plugin prumerge`: examples/openai_client.py works unchanged, and
`usage.prompt_tokens` carries the reduced visual tokens. With --trust-request-mm-kwargs a request
picks its reduction with `mm_processor_kwargs={"prumerge": ...}`.

Locally (a private Ray instance; serves until Ctrl-C):
    python examples/ray_serve.py --tiny --trust-request-mm-kwargs --port 8000
    python examples/openai_client.py inputs --base-url http://127.0.0.1:8000/v1 --mode prumerge+

On a cluster (the plugin installed on every node), e.g. 2 to 8 one-GPU replicas:
    python examples/ray_serve.py --model llava-hf/llava-1.5-7b-hf --address auto \\
        --min-replicas 2 --max-replicas 8 --gpus-per-replica 1
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import common

from vllm_prumerge.testing.engine_args import add_number_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common.add_model_arguments(parser)
    parser.add_argument(
        "--model-id",
        default=None,
        help="the model name clients send ('model' of the OpenAI API). Default: --model, or "
        "'tiny-llava' with --tiny.",
    )
    common.add_reduction_arguments(parser, mode_default="prumerge")
    parser.add_argument(
        "--trust-request-mm-kwargs",
        action="store_true",
        help="let requests choose the reduction (vLLM's switch for per-request "
        "mm_processor_kwargs); enable it only for trusted clients.",
    )
    serve_group = parser.add_argument_group("Ray Serve")
    serve_group.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join ('auto', or ray://HOST:10001). Default: start a local Ray "
        "instance with --num-cpus logical CPUs.",
    )
    serve_group.add_argument(
        "--num-cpus",
        type=int,
        default=4,
        help="logical CPUs of the local Ray instance (ignored with --address). Default: 4.",
    )
    serve_group.add_argument(
        "--host", default="127.0.0.1", help="HTTP host of Ray Serve. Default: 127.0.0.1."
    )
    add_number_options(
        serve_group,
        ("--port", int, 8000, "HTTP port of Ray Serve. Default: 8000."),
        ("--min-replicas", int, 1, "fewest vLLM replicas. Default: 1."),
        (
            "--max-replicas",
            int,
            1,
            "most vLLM replicas; above --min-replicas Ray Serve autoscales. Default: 1.",
        ),
        ("--cpus-per-replica", float, 1.0, "CPUs per replica. Default: 1."),
        (
            "--gpus-per-replica",
            float,
            0.0,
            "GPUs per replica (1 on a GPU cluster). Default: 0 (vLLM on CPU).",
        ),
    )
    serve_group.add_argument(
        "--ready-file",
        default=None,
        help="write the base URL to this file once the application is serving (for scripts "
        "and tests that wait for it).",
    )
    common.add_engine_arguments(parser)
    return parser


def llm_config(args: argparse.Namespace, model: str, options: dict, engine_args: dict):
    """The `ray.serve.llm.LLMConfig` of one PruMerge model."""
    from ray.serve.llm import LLMConfig

    from vllm_prumerge import engine_kwargs

    bundle = {"CPU": args.cpus_per_replica}
    if args.gpus_per_replica:
        bundle["GPU"] = args.gpus_per_replica
    kwargs = {**engine_args, **engine_kwargs(**options)}
    if args.trust_request_mm_kwargs:
        kwargs["trust_request_mm_kwargs"] = True  # a vLLM front-end argument
    # vLLM settings of this shell (e.g. VLLM_CPU_KVCACHE_SPACE) apply to the replicas too.
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    return LLMConfig(
        model_loading_config={
            "model_id": args.model_id or ("tiny-llava" if args.tiny else model),
            "model_source": model,
        },
        engine_kwargs=kwargs,
        placement_group_config={"bundles": [bundle]},
        deployment_config={
            "autoscaling_config": {
                "min_replicas": args.min_replicas,
                "max_replicas": args.max_replicas,
            }
        },
        runtime_env={"env_vars": env_vars} if env_vars else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.min_replicas <= args.max_replicas:
        parser.error("need 1 <= --min-replicas <= --max-replicas")
    try:
        options = common.reduction_options(args, args.mode)
        engine_args = common.engine_arguments(args)
    except ValueError as exc:
        parser.error(str(exc))

    common.use_cpu_if_no_gpu()
    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    model = common.checkpoint_of(args)
    config = llm_config(args, model, options, engine_args)
    serve.start(http_options={"host": args.host, "port": args.port})
    started = time.perf_counter()
    print("starting the application (vLLM engine start-up: about a minute on 2 CPU cores)")
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
    url = f"http://{args.host}:{args.port}"
    print(f"serving {config.model_id} at {url}/v1 ({time.perf_counter() - started:.0f} s)")
    if args.ready_file:
        with open(args.ready_file, "w", encoding="utf-8") as ready:
            ready.write(url + "\n")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("shutting down", file=sys.stderr)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
