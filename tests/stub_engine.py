"""A minimal engine for tests of callers (`draw`, `score_many`'s default): one token, no model.
Tests override what they observe (`score`, `sample`); every other primitive answers trivially."""

import numpy as np

from tailmon.engines.base import Engine, Samples


class StubEngine(Engine):
    name = "stub"

    def sample(self, prompt, variant, n, seed):
        return Samples([[0]] * n, np.zeros(n), [True] * n)

    def score(self, prompt, variant, responses):
        return np.zeros(len(responses))

    def next_token_logprobs(self, prompt, variant, prefixes):
        return np.zeros((len(prefixes), 1))

    def decode(self, token_ids):
        return ""

    def token_text(self, token_id):
        return ""

    @property
    def stop_token_ids(self):
        return frozenset({0})

    @property
    def vocab_size(self):
        return 1
