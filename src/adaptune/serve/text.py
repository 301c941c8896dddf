"""Token ids to text, one token at a time, as a stream can send it.

Decoding a token alone is wrong for many tokenizers (SentencePiece drops the space in front of a
word; a byte-level token may hold half a UTF-8 character), so each step decodes a short window
of the tokens before it and sends only what the new token added (the method of Hugging Face's
text-generation-inference and vLLM). Text that may be the start of a stop string is held back
until it is clearly not, so that a stop string never reaches the client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
WINDOW = 5  # tokens of context kept in front of the new ones


class TextStream:
    """The text of the tokens pushed so far, released in pieces that are safe to send."""

    def __init__(self, decode: Decode, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._ids = list(prompt_ids[-WINDOW:])
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens before this are already in the text
        self._stop = tuple(s for s in stop if s)
        self.text = ""  # all text decoded so far (until a stop string: the text before it)
        self._sent = 0
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        """Add a token; return the text that may be sent now."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):  # U+FFFD: an unfinished character
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
            if len(self._ids) > 4 * WINDOW:
                drop = self._prefix
                self._ids = self._ids[drop:]
                self._prefix, self._read = 0, self._read - drop
        self._find_stop()
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The text still held back (the generation ended without a stop string)."""
        return self._release(final=True)

    def _find_stop(self) -> None:
        if not self._stop:
            return
        start = max(0, self._sent - max(len(s) for s in self._stop))
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        if end <= self._sent:
            return ""
        piece, self._sent = self.text[self._sent:end], end
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of the text that some stop string starts with."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest
