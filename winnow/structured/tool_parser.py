"""One incremental tool-call parser per choice: generated text (and token ids) in, OpenAI's
tool-call framing out.

Events: `ContentText` for text outside calls, `CallOpened` once per call (index, id, name), then
`CallArguments` with the raw argument text piece by piece. Whatever is fed, in whatever pieces,
the concatenated events are the same, so a streamed reply accumulates to the non-streamed one.
Text that only might open a call (a partial `<tool_call>`, a leading `{`) is held back until it
is decided; text that turns out not to be a call comes out as content, unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum, auto

from winnow.structured.tool_formats import ToolFormat

ARGUMENT_KEYS = ("arguments", "parameters")
_CALL_START = re.compile(r'\s*(\[\s*)?\{\s*"')
_CALL_START_SO_FAR = re.compile(r"\s*(\[\s*)?(\{\s*)?\Z")


@dataclass(frozen=True)
class ContentText:
    text: str


@dataclass(frozen=True)
class CallOpened:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    fragment: str


ToolEvent = ContentText | CallOpened | CallArguments


class _Scan(Enum):
    OPEN = auto()  # before the object's `{`
    KEY = auto()  # expecting a key (or `}`)
    IN_KEY = auto()
    COLON = auto()
    VALUE = auto()  # expecting a value
    IN_VALUE = auto()
    AFTER_VALUE = auto()  # expecting `,` or `}`


class CallObjectScanner:
    """Reads one `{"name": ..., "arguments": ...}` object character by character.

    The arguments' raw text is released as soon as the name is known (models write the name
    first; if they don't, the arguments wait for it). Arguments written as a JSON string are
    decoded when complete. `failed` means the text is not a call object.
    """

    def __init__(self) -> None:
        self.state = _Scan.OPEN
        self.name: str | None = None
        self.done = False
        self.failed = False
        self.saw_arguments = False
        self._key: list[str] = []
        self._current_key = ""
        self._value: list[str] = []
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._scalar = False
        self._arguments: list[str] = []  # raw argument text not yet taken
        self._string_arguments = False

    def push(self, text: str) -> int:
        """Consume `text` up to the end of the object; the number of characters consumed."""
        for i, char in enumerate(text):
            if not self._step(char):
                self.failed = True
                return i
            if self.done:
                return i + 1
        return len(text)

    def take_arguments(self) -> str:
        """Argument text that may be sent now (nothing before the name is known)."""
        if self.name is None or self._string_arguments and not self.done:
            return ""
        taken = "".join(self._arguments)
        self._arguments.clear()
        if self._string_arguments and taken:
            decoded = json.loads(taken)
            return decoded if isinstance(decoded, str) else taken
        return taken

    def _step(self, char: str) -> bool:
        state = self.state
        if state is _Scan.IN_KEY:
            return self._key_char(char)
        if state is _Scan.IN_VALUE:
            return self._value_char(char)
        if char.isspace():
            return True
        if state is _Scan.OPEN:
            self.state = _Scan.KEY
            return char == "{"
        if state is _Scan.KEY:
            if char == "}" and not self._current_key:
                return self._close()
            self.state = _Scan.IN_KEY
            self._key = []
            return char == '"'
        if state is _Scan.COLON:
            self.state = _Scan.VALUE
            return char == ":"
        if state is _Scan.VALUE:
            return self._start_value(char)
        # AFTER_VALUE
        if char == ",":
            self.state = _Scan.KEY
            return True
        return char == "}" and self._close()

    def _close(self) -> bool:
        self.done = True
        return self.name is not None

    def _key_char(self, char: str) -> bool:
        if self._escaped:
            self._escaped = False
        elif char == "\\":
            self._escaped = True
        elif char == '"':
            self._current_key = json.loads('"' + "".join(self._key) + '"')
            self.state = _Scan.COLON
            return True
        self._key.append(char)
        return True

    def _start_value(self, char: str) -> bool:
        key = self._current_key
        if key == "name" and (char != '"' or self.name is not None):
            return False
        if key in ARGUMENT_KEYS:
            if self.saw_arguments:
                return False
            self.saw_arguments = True
            self._string_arguments = char == '"'
        self.state = _Scan.IN_VALUE
        self._value = []
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._scalar = char not in '{["'
        return self._value_char(char)

    def _value_char(self, char: str) -> bool:
        if self._scalar and (char in ",}" or char.isspace()):
            self._end_value()
            return self._step(char)
        self._value.append(char)
        if self._current_key in ARGUMENT_KEYS:
            self._arguments.append(char)
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                if self._depth == 0:
                    self._end_value()
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
            if self._depth < 0:
                return False
            if self._depth == 0:
                self._end_value()
        return True

    def _end_value(self) -> None:
        if self._current_key == "name":
            self.name = json.loads("".join(self._value))
        self._current_key = ""
        self.state = _Scan.AFTER_VALUE


class _Mode(Enum):
    TEXT = auto()
    OPENED = auto()  # after an opener: whitespace, then `[` (bracketed) or `{`
    CALL = auto()  # inside a call object
    AFTER_CALL = auto()  # a call object ended: closer, separator, `]`, or back to text
    DONE = auto()  # the allowed number of calls is reached: the rest is dropped


class ToolCallParser:
    """Parses one choice's output in the given format; `max_calls` 1 keeps only the first call
    (`parallel_tool_calls: false`)."""

    def __init__(self, fmt: ToolFormat, max_calls: int | None = None) -> None:
        self._fmt = fmt
        self._max_calls = max_calls
        self._mode = _Mode.TEXT
        self._buffer = ""  # text not yet decided
        self._held_space = ""  # trailing whitespace of content: dropped if a call follows
        self._raw = ""  # the current call region's text, given back as content if it fails
        self._in_list = False
        self._scanner: CallObjectScanner | None = None
        self._call_open = False
        self._seen_text = False
        self.calls = 0
        self._events: list[ToolEvent] = []

    def feed(self, text: str, token_ids: list[int] | tuple[int, ...] = ()) -> list[ToolEvent]:
        """The events for the next piece of output. `token_ids` are the tokens that produced
        `text`, for formats whose opener is a special token that has no text."""
        opener_id = self._fmt.opener_token_id
        if opener_id is not None and opener_id in token_ids and self._mode is _Mode.TEXT:
            # Text held back before the opener can arrive in the same piece: the region starts
            # where its first call object does (or could, once more text arrives).
            start = _CALL_START.search(text) or _CALL_START_SO_FAR.search(text)
            cut = start.start() if start else 0
            self._buffer += text[:cut]
            self._flush_text()
            self._open_region("")
            text = text[cut:]
        self._buffer += text
        self._run()
        return self._take()

    def finish(self) -> list[ToolEvent]:
        """The events left when the output ends (undecided text comes out as content)."""
        if self._mode is _Mode.CALL and self._call_open:
            self._end_call(complete=False)
        elif self._mode in (_Mode.CALL, _Mode.OPENED):
            self._give_back_region()
        if self._mode is _Mode.TEXT:
            self._content(self._buffer)
        self._buffer = ""
        if self.calls == 0 and self._held_space:
            self._events.append(ContentText(self._held_space))
        self._held_space = ""
        return self._take()

    def _take(self) -> list[ToolEvent]:
        events, self._events = self._events, []
        return events

    def _run(self) -> None:
        while self._buffer:
            before = (self._mode, len(self._buffer))
            if self._mode is _Mode.TEXT:
                self._scan_text()
            elif self._mode is _Mode.OPENED:
                self._scan_opened()
            elif self._mode is _Mode.CALL:
                self._scan_call()
            elif self._mode is _Mode.AFTER_CALL:
                self._scan_after_call()
            else:
                self._buffer = ""
            if (self._mode, len(self._buffer)) == before:
                return  # waiting for more text

    # -- text outside calls

    def _scan_text(self) -> None:
        fmt = self._fmt
        buffer = self._buffer
        stripped = buffer.lstrip()
        if fmt.bare_json and not self._seen_text and stripped.startswith("{"):
            self._buffer = stripped
            self._open_region(buffer[: len(buffer) - len(stripped)])
            self._mode = _Mode.CALL
            self._scanner = CallObjectScanner()
            return
        start = buffer.find(fmt.opener)
        if start >= 0:
            self._content(buffer[:start])
            self._buffer = buffer[start + len(fmt.opener) :]
            self._open_region(fmt.opener)
            return
        keep = _partial_suffix(buffer, fmt.opener)
        if fmt.bare_json and not self._seen_text and not buffer.strip():
            keep = len(buffer)
        self._content(buffer[: len(buffer) - keep])
        self._buffer = buffer[len(buffer) - keep :]

    def _content(self, text: str) -> None:
        if not text:
            return
        text = self._held_space + text
        kept = text.rstrip()
        self._held_space = text[len(kept) :]
        if kept:
            self._seen_text = True
            self._events.append(ContentText(kept))

    def _flush_text(self) -> None:
        self._content(self._buffer)
        self._buffer = ""

    def _open_region(self, opener_text: str) -> None:
        self._mode = _Mode.OPENED
        self._raw = opener_text
        self._in_list = False

    # -- call regions

    def _scan_opened(self) -> None:
        stripped = self._buffer.lstrip()
        self._raw += self._buffer[: len(self._buffer) - len(stripped)]
        self._buffer = stripped
        if not stripped:
            return
        if self._fmt.bracketed and not self._in_list and stripped[0] == "[":
            self._in_list = True
            self._raw += "["
            self._buffer = stripped[1:]
            return
        if stripped[0] != "{":
            self._give_back_region()
            return
        self._mode = _Mode.CALL
        self._scanner = CallObjectScanner()

    def _scan_call(self) -> None:
        scanner = self._scanner
        assert scanner is not None
        used = scanner.push(self._buffer)
        self._raw += self._buffer[:used]
        self._buffer = self._buffer[used:]
        if scanner.name is not None and not self._call_open:
            self._call_open = True
            self._held_space = ""
            self._events.append(CallOpened(self.calls, self._fmt.new_call_id(), scanner.name))
        if scanner.failed and not self._call_open:
            self._give_back_region()
            return
        self._release_arguments()
        if scanner.done or scanner.failed:
            self._end_call(complete=scanner.done and not scanner.failed)

    def _release_arguments(self) -> None:
        assert self._scanner is not None
        fragment = self._scanner.take_arguments()
        if fragment:
            self._events.append(CallArguments(self.calls, fragment))

    def _end_call(self, *, complete: bool) -> None:
        assert self._scanner is not None
        if complete and not self._scanner.saw_arguments:
            self._events.append(CallArguments(self.calls, "{}"))
        self._scanner = None
        self._call_open = False
        self._raw = ""
        self.calls += 1
        self._seen_text = True
        if self._max_calls is not None and self.calls >= self._max_calls:
            self._mode = _Mode.DONE
        else:
            self._mode = _Mode.AFTER_CALL if complete else _Mode.TEXT

    def _scan_after_call(self) -> None:
        fmt = self._fmt
        stripped = self._buffer.lstrip()
        if not stripped:
            self._buffer = ""
            return
        if self._in_list:
            self._buffer = stripped[1:]
            if stripped[0] == ",":
                self._mode = _Mode.OPENED
            else:
                self._in_list = False
                self._mode = _Mode.TEXT
                if stripped[0] != "]":
                    self._buffer = stripped
            return
        if fmt.closer:
            if stripped.startswith(fmt.closer):
                self._buffer = stripped[len(fmt.closer) :]
                self._mode = _Mode.TEXT
            elif not fmt.closer.startswith(stripped):
                self._mode = _Mode.TEXT
            return
        if fmt.bare_json and stripped[0] == ";":
            self._buffer = stripped[1:]
            self._open_region("")
            return
        self._mode = _Mode.TEXT

    def _give_back_region(self) -> None:
        """The region was not a call after all: its text is content."""
        self._mode = _Mode.TEXT
        self._scanner = None
        self._in_list = False
        self._buffer = self._raw + self._buffer
        self._raw = ""
        self._seen_text = True
        # the opener matched once; scanning resumes after it so it is not matched again
        opener = self._fmt.opener
        if opener and self._buffer.startswith(opener):
            self._content(opener)
            self._buffer = self._buffer[len(opener) :]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
