"""What the Cloud Tasks work queue costs on our side, in one process: ``python bench/cloud_tasks_queue.py``.

CPU per operation, side by side in the same run (docs/benchmarks.md, "Cloud Tasks work queue"):

- the push endpoint: ``POST /v1/work`` with a genuine OIDC token (RS256 verified against the cached JWKS, the body
  decoded, a handler that returns at once) against ``GET /healthz`` on the same uvicorn server (no token, no
  handler): what verifying a push adds to serving one request;
- a put: ``CreateTask`` with the real asyncio client over gRPC to the in-process fake (its own CPU included, so an
  upper bound of ours; Google's latency is not measured here) against ``XADD`` of the Redis queue on
  ``REDIS_URL`` (default 127.0.0.1:6379). The created tasks are scheduled an hour ahead, so the fake pushes none of
  them during the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/cloud_tasks_queue.py` from anywhere

from altan.listen import listen_socket
from services.agent.cloud_tasks import PUSH_PATH, CloudTasksWorkQueue, PushAuth
from services.agent.work_queue import RedisWorkQueue, WorkItem
from tests.fakes.cloud_tasks import QUEUE, SERVICE_ACCOUNT, FakeCloudTasks


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _timed(op: Callable[[int], Awaitable[object]], count: int, in_flight: int) -> float:
    """Microseconds of this process's CPU per operation (client and server both, all threads), ``in_flight`` at a
    time, after a warm-up: CPU rather than wall time, which a shared machine makes meaningless."""
    for i in range(min(50, count)):
        await op(-i - 1)

    async def worker(start: int) -> None:
        for i in range(start, count, in_flight):
            await op(i)

    started = _cpu()
    await asyncio.gather(*(worker(n) for n in range(in_flight)))
    return (_cpu() - started) * 1e6 / count


async def main(count: int, redis_url: str) -> None:
    fake = FakeCloudTasks().start()
    sock = listen_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}{PUSH_PATH}"
    queue = CloudTasksWorkQueue(
        queue=QUEUE,
        push_url=url,
        service_account=SERVICE_ACCOUNT,
        audience=url,
        dispatch_deadline_seconds=60,
        timeout_seconds=10,
        push_socket=sock,
        auth=PushAuth(fake.jwks_url, url, SERVICE_ACCOUNT),
        emulator_host=fake.address,
    )
    queue.open()

    async def nothing(item: WorkItem) -> None:
        return None

    serving = asyncio.create_task(queue.serve(nothing))
    key = f"altan:bench-{uuid.uuid4().hex[:8]}:agent:work"
    stream = RedisWorkQueue(redis_url, key=key, concurrency=1, lease_seconds=30)
    token = fake.sign(fake.claims(url))
    later = int(time.time() * 1000) + 3_600_000
    rows: list[tuple[str, int, float, float]] = []
    try:
        async with httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=32)) as client:
            while True:
                try:
                    await client.get(url.replace(PUSH_PATH, "/healthz"))
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)

            async def push(i: int) -> object:
                body = WorkItem("bench", f"tsk_{i}").encode()  # one item per push: a second at once would be 503
                answer = await client.post(url, content=body, headers={"Authorization": f"Bearer {token}"})
                assert answer.status_code == 200, answer.text
                return answer

            async def health(i: int) -> object:
                return await client.get(url.replace(PUSH_PATH, "/healthz"))

            for in_flight in (1, 16):
                rows.append(
                    (
                        "push: POST /v1/work (token verified) vs GET /healthz",
                        in_flight,
                        await _timed(push, count, in_flight),
                        await _timed(health, count, in_flight),
                    )
                )

        async def create(i: int) -> None:
            await queue.wake(WorkItem("bench", f"tsk_{i}_{uuid.uuid4().hex[:6]}"), "bench", at_ms=later)

        async def xadd(i: int) -> None:
            await stream.put(WorkItem("bench", f"tsk_{i}"))

        for in_flight in (1, 16):
            rows.append(
                (
                    "put: CreateTask (fake, gRPC) vs XADD (Redis)",
                    in_flight,
                    await _timed(create, count, in_flight),
                    await _timed(xadd, count, in_flight),
                )
            )
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await queue.aclose()
        await stream.aclose()
        redis.Redis.from_url(redis_url).delete(key)
        fake.close()
    print(f"{'operation':55} {'in flight':>9} {'CPU µs/op':>9} {'baseline':>15} {'ratio':>7}")
    for name, in_flight, measured, baseline in rows:
        print(f"{name:55} {in_flight:>9} {measured:>9.0f} {baseline:>15.0f} {measured / baseline:>7.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    arguments = parser.parse_args()
    asyncio.run(main(arguments.count, arguments.redis_url))
