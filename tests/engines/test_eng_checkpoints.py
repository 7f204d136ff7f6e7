"""Checkpoints between the engine's batches (issue 18, item 11): a daemon's run may stop there
(its time limit, a shutdown), and each one is progress for the systemd watchdog."""

from __future__ import annotations

import pytest

from tailmon.engines.base import Decoding, Variant, checkpoint, checkpoints, unbatched_step


class Hook:
    def __init__(self, stop_after: int | None = None):
        self.calls, self.stop_after, self.unbatched_calls = 0, stop_after, []

    def checkpoint(self):
        self.calls += 1
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise TimeoutError("stop here")

    def unbatched(self, entering):
        self.unbatched_calls.append(entering)


V = Variant("t", Decoding(max_new_tokens=3))


def test_every_sampling_batch_scoring_chunk_and_next_token_chunk_is_a_checkpoint(make_tiny_engine):
    """Catches an engine loop without its checkpoint: a run would then stop (or show progress)
    only between prompts, minutes apart on a real model."""
    engine = make_tiny_engine(batch_size=4)
    hook = Hook()
    with checkpoints(hook):
        s = engine.sample("ab", V, 10, seed=0)  # batches of 4, 4, 2
        assert hook.calls == 3
        engine.score("ab", V, s.token_ids)
        assert hook.calls > 3
        before = hook.calls
        engine.next_token_logprobs("ab", V, [[], [7]])
        assert hook.calls > before
    after = hook.calls
    engine.sample("ab", V, 10, seed=0)  # outside the block: no hook, and checkpoint() is a no-op
    checkpoint()
    assert hook.calls == after


def test_a_raising_hook_stops_sampling_between_batches(make_tiny_engine):
    """Catches a checkpoint that does not stop the work (the time limit would then be ignored)."""
    engine = make_tiny_engine(batch_size=4)
    hook = Hook(stop_after=2)
    with checkpoints(hook), pytest.raises(TimeoutError):
        engine.sample("ab", V, 40, seed=0)
    assert hook.calls == 2  # 2 of 10 batches ran


def test_an_unbatched_step_is_reported_and_closed():
    """Catches a model load counted as a stall (no progress for minutes) or left open (a later
    stall never seen), also when the load fails."""
    hook = Hook()
    with checkpoints(hook):
        with unbatched_step():
            assert hook.unbatched_calls == [True]
        assert hook.unbatched_calls == [True, False] and hook.calls == 0
        with pytest.raises(OSError), unbatched_step():
            raise OSError("no such model")
        assert hook.unbatched_calls == [True, False, True, False]
