"""What one request may ask for: the API's bounds, in one place.

The request models (`winnow.server.protocol`, which /openapi.json shows), `SamplingParams` (which
checks them again for callers that skip the HTTP layer), the command line and the docs
(docs/errors-and-limits.md, docs/sampling.md) all take these numbers from here. The defaults of
sampling fields a request leaves out live on `SamplingParams` alone; the limits that depend on the
model served (context length, vocabulary, `--max-n`) are checked by the engine at admission.
It imports nothing from Winnow, so every room may import it.
"""

from __future__ import annotations

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

TEMPERATURE_MAX = 2.0
PENALTY_MAX = 2.0  # frequency_penalty and presence_penalty lie in [-PENALTY_MAX, PENALTY_MAX]
LOGIT_BIAS_LIMIT = 100.0  # each bias lies in [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT]
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_TOP_LOGPROBS = 20  # OpenAI's bound; --max-logprobs may only lower it
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 256
MAX_TOOLS = 128
MAX_MESSAGES = 4096
MAX_INPUT_ITEMS = MAX_MESSAGES  # items in a Responses `input` list
MAX_STOP_TOTAL_CHARS = 4096  # all stop strings of a request together

# The shape of a JSON schema (response_format, a tool's parameters), checked before the grammar
# compiler sees it: the compiler recurses per property and per required name (30,000 names
# overflowed its stack), and meta-validation takes time in proportion to the schema's size.
# Near OpenAI's own structured-output bounds (5,000 properties, 1,000 enum values).
MAX_SCHEMA_PROPERTIES = 5000  # all `properties` entries in one schema together
MAX_SCHEMA_REQUIRED = 5000  # names in one `required` list
MAX_SCHEMA_ENUM = 1000  # values in one `enum` list
MAX_SCHEMA_NODES = 100_000  # JSON values (objects, arrays, scalars) in one schema

# Tensor parallel: how long a rank waits for the others to join (loading the weights included),
# and for one step's collective, before the wait is an error rather than a hang.
TP_STARTUP_TIMEOUT_S = 600
TP_STEP_TIMEOUT_S = 20
# How long a stopping server waits for its worker ranks to exit before killing them.
TP_WORKER_EXIT_S = 10

# The logprob reported for a token the sampler ruled out (-inf is not JSON), as OpenAI reports it.
LOGPROB_FLOOR = -9999.0


class InvalidRequest(ValueError):
    """A request that can never be served as asked: answered with a 400 whose body names `param`
    (the request field at fault) and `code` (a machine-readable reason, or None)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
