"""Loaded by every Python process started with this folder on PYTHONPATH (the isolation test's
server): a request whose prompt holds token WINNOW_TEST_TEXT_FAULT_MARK (legacy completions pass
the prompt to the detokeniser as context) gets a detokeniser that raises at its fourth token.
Test-only; it never ships."""

import os

_MARK = int(os.environ.get("WINNOW_TEST_TEXT_FAULT_MARK", "0"))
_TOKENS_BEFORE_FAULT = 3

if _MARK:
    import winnow.text.detokenizers as _detokenizers

    _real_new = _detokenizers.Detokenizers.new

    class _Failing:
        def __init__(self, inner):  # type: ignore[no-untyped-def]
            self._inner = inner
            self._tokens = 0

        def append(self, token_id):  # type: ignore[no-untyped-def]
            self._tokens += 1
            if self._tokens > _TOKENS_BEFORE_FAULT:
                raise RuntimeError("injected detokeniser fault")
            return self._inner.append(token_id)

        def flush(self):  # type: ignore[no-untyped-def]
            return self._inner.flush()

    def _new(self, prompt_token_ids):  # type: ignore[no-untyped-def]
        detokenizer = _real_new(self, prompt_token_ids)
        return _Failing(detokenizer) if _MARK in prompt_token_ids else detokenizer

    _detokenizers.Detokenizers.new = _new
