"""Profile one sender draining a queue into the sandbox (pyinstrument).

pip install -e '.[dev,profile]'
python -m tests.benchmarks.profile_sender --events 200000
"""

from __future__ import annotations

import argparse
import asyncio
import time

from capi.settings import Settings
from capi.worker.lanes import run_sender
from capi.worker.sender import Sender
from tests.benchmarks.bench import enqueue_bulk, reset, sample_events, services


def main() -> None:
    try:
        from pyinstrument import Profiler
    except ImportError:
        raise SystemExit(
            "profiling needs pyinstrument, from the profile extra: pip install -e '.[dev,profile]'"
        ) from None
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    with services() as env:
        reset(env)
        enqueue_bulk(env, sample_events(args.events, "prof"))
        settings = Settings(
            _env_file=None,
            api_key=env["CAPI_API_KEY"],
            pixel_id=env["CAPI_PIXEL_ID"],
            base_url=env["CAPI_BASE_URL"],
            redis_url=env["CAPI_REDIS_URL"],
            batch_size=args.batch,
            batch_wait_ms=20,
        )

        async def drain() -> None:
            sender = Sender.from_settings(settings)
            await run_sender(sender, burst=True)
            await sender.aclose()

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        started = time.perf_counter()
        with profiler:
            asyncio.run(drain())
        elapsed = time.perf_counter() - started
    print(
        f"{args.events} events in {elapsed:.2f} s: {args.events / elapsed:,.0f} events/s "
        "(including start-up and the burst exit check)"
    )
    print(profiler.output_text(unicode=False, color=False, show_all=False))


if __name__ == "__main__":
    main()
