"""A list of prompts in one text-completion request, run as one engine request per prompt and
seen by the route as a single generation whose choices OpenAI numbers `prompt * n + choice`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from winnow.engine.outputs import RequestOutput
from winnow.server.generation import Generation


class GenerationBatch:
    """The generations of prompts 0..k-1 (each with n choices), merged into one output stream.

    Every merged output carries its own prompt's seed, its choices renumbered, and the token
    counts summed over the prompts so far; it is `finished` once every prompt has finished."""

    def __init__(self, start: Callable[[int], Generation], num_prompts: int, n: int) -> None:
        """Start prompt i with `start(i)`; if one cannot start, the ones started are aborted."""
        self.n = n
        self.generations: list[Generation] = []
        try:
            for index in range(num_prompts):
                self.generations.append(start(index))
        except BaseException:
            self.close()
            raise
        self.seeds: list[int | None] = [None] * num_prompts
        self._latest: list[RequestOutput | None] = [None] * num_prompts
        self._finished = [False] * num_prompts

    @property
    def finished(self) -> bool:
        return all(self._finished)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Outputs of all prompts as they come; all are aborted if iteration stops early."""
        streams = [generation.outputs() for generation in self.generations]
        pending = {asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(streams)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=pending.__getitem__):
                    prompt = pending.pop(task)
                    try:
                        output = task.result()
                    except StopAsyncIteration:
                        continue
                    pending[asyncio.ensure_future(anext(streams[prompt]))] = prompt
                    yield self._merged(prompt, output)
        finally:
            for task in pending:
                task.cancel()
            self.close()

    def _merged(self, prompt: int, output: RequestOutput) -> RequestOutput:
        self.seeds[prompt] = output.seed
        self._latest[prompt] = output
        self._finished[prompt] = output.finished
        seen = [latest for latest in self._latest if latest is not None]
        return replace(
            output,
            choices=[
                replace(choice, index=prompt * self.n + choice.index) for choice in output.choices
            ],
            prompt_tokens=sum(latest.prompt_tokens for latest in seen),
            cached_tokens=sum(latest.cached_tokens for latest in seen),
            completion_tokens=sum(latest.completion_tokens for latest in seen),
            finished=self.finished,
        )

    def close(self) -> None:
        for generation in self.generations:
            generation.close()
