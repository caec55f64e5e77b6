"""What a quarantined message is, for an admin who should not need its raw headers: its
Subject, decoded, and a plain-text preview of its body.

Both read hostile mail, so both are bounded and both give text only (the console escapes
it; nothing of it is ever rendered as HTML, nor linked). The Subject is read from the
message's first `HEAD_BYTES` (a listing reads no more of each message: `Quarantine.head`).
The preview walks the first `PREVIEW_SCAN` bytes of the message with secumail/mime.py's
bounded walk, takes the first text/plain part that is not an attachment (else the first
text/html one, its tags, scripts and styles dropped by a linear scan, not a parser), undoes
its transfer encoding, decodes its charset with errors replaced, and keeps `PREVIEW_CHARS`.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from secumail.message import header_block_end, normalize_newlines
from secumail.mime import (
    ENCODED_WORD,
    MimeTooComplex,
    Part,
    decode_body,
    decoded_word,
    in_charset,
    walk,
)

HEAD_BYTES = 65_536  # what is read of a listed message, at most: its header block
SUBJECT_CHARS = 120
PREVIEW_CHARS = 4096
PREVIEW_SCAN = 1 << 20  # the bytes of a message walked for its text (1 MiB: ~0.3 s at worst)
PREVIEW_PARTS = 1000
PREVIEW_DEPTH = 10
PLAIN_BYTES = 4 * PREVIEW_CHARS  # UTF-8 takes up to 4 bytes a character
HTML_BYTES = 262_144  # markup decoded for a preview (a newsletter's styles come first)

# The first Subject field of a header block, with its continuation lines.
_SUBJECT = re.compile(rb"^subject[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.I | re.M)
_FOLD = re.compile(r"\r\n(?=[ \t])")
# C0 and C1 controls (not tab or LF), and the marks that reorder text on screen (Unicode
# bidirectional overrides and isolates): a subject must not pass for another.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e"
                     "\u2066-\u2069\ufeff]")


def decode_words(text: str) -> str:
    """RFC 2047 encoded words decoded, the white space between two of them dropped (it
    only separates them); one that cannot be decoded stays as it was."""
    pieces: list[str] = []
    position, after_word = 0, False
    for found in ENCODED_WORD.finditer(text):
        gap = text[position:found.start()]
        if not (after_word and not gap.strip(" \t")):
            pieces.append(gap)
        pieces.append(decoded_word(found))
        position, after_word = found.end(), True
    pieces.append(text[position:])
    return "".join(pieces)


def one_line(text: str, limit: int) -> str:
    """Controls and reordering marks gone, white space runs one space, cut to `limit`
    characters (an ellipsis saying so)."""
    text = " ".join(_UNSAFE.sub(" ", text).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "\u2026"


def subject(message: bytes) -> str:
    """The message's (first) Subject, decoded and unfolded, one line of `SUBJECT_CHARS` at
    most; "" without one. Reads the header block within the first `HEAD_BYTES` only."""
    head = normalize_newlines(message[:HEAD_BYTES])
    found = _SUBJECT.search(head, 0, header_block_end(head))
    if found is None:
        return ""
    value = _FOLD.sub("", found.group(1).decode("utf-8", "replace"))
    # Decoded words are cut first: a long subject is not decoded past what is shown.
    return one_line(decode_words(value[:SUBJECT_CHARS * 16]), SUBJECT_CHARS)


@dataclass(frozen=True)
class Preview:
    text: str  # at most PREVIEW_CHARS characters, plain text: escape it to show it
    source: str  # "text/plain", "text/html", or "" when there is no text to show
    truncated: bool  # the text goes on past the preview
    note: str = ""  # why there is none, or why another text may come first


def _clean_text(text: str) -> str:
    """Line ends as LF, controls (but tab and LF) and reordering marks as spaces."""
    return _UNSAFE.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))


def _charset(part: Part) -> str | None:
    try:
        return part.headers.get_content_charset()
    except Exception:  # a parameter the email package cannot read: a hostile header
        return None


def _attachment(part: Part) -> bool:
    try:
        return part.headers.get_content_disposition() == "attachment"
    except Exception:
        return False


def preview(message: bytes) -> Preview:
    """The body's first text, as plain text; see the module's docstring for the bounds."""
    cut = len(message) > PREVIEW_SCAN
    scanned = normalize_newlines(message[:PREVIEW_SCAN])
    markup: Part | None = None
    note = ""
    try:
        for part in walk(scanned, PREVIEW_PARTS, PREVIEW_DEPTH):
            if _attachment(part):
                continue
            if part.content_type == "text/plain":
                return _plain(scanned, part, cut and part.end >= len(scanned))
            if part.content_type == "text/html" and markup is None:
                markup = part
    except MimeTooComplex as error:
        note = f"not every part was read: {error}"
    else:
        if cut:
            note = f"only the first {PREVIEW_SCAN >> 20} MiB of the message was read"
    if markup is not None:
        return _html(scanned, markup, cut and markup.end >= len(scanned), note)
    return Preview("", "", False, note or "the message has no text part")


def _plain(message: bytes, part: Part, cut: bool) -> Preview:
    data = decode_body(message, part, PLAIN_BYTES + 1)
    longer = cut or len(data) > PLAIN_BYTES
    text = _clean_text(in_charset(data[:PLAIN_BYTES], _charset(part), final=not longer)).rstrip()
    return Preview(text[:PREVIEW_CHARS], "text/plain", longer or len(text) > PREVIEW_CHARS)


def _html(message: bytes, part: Part, cut: bool, note: str) -> Preview:
    data = decode_body(message, part, HTML_BYTES + 1)
    longer = cut or len(data) > HTML_BYTES
    markup = in_charset(data[:HTML_BYTES], _charset(part), final=not longer)
    text = _clean_text(html_text(markup, PREVIEW_CHARS + 1))
    return Preview(text[:PREVIEW_CHARS], "text/html", longer or len(text) > PREVIEW_CHARS,
                   note)


_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9]*)")
# Elements whose content is no text a reader sees.
_HIDDEN = {name: re.compile(rf"</{name}(?![a-zA-Z0-9])", re.I)
           for name in ("script", "style", "title", "template")}
_BLOCKS = frozenset("address article aside blockquote br dd div dl dt fieldset figure footer "
                    "form h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section table tr "
                    "ul".split())
_SPACES = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")


def html_text(markup: str, limit: int) -> str:
    """The text a reader of `markup` sees, roughly: tags, comments, scripts, styles and
    titles dropped, entities decoded, white space runs one space, a line break for each
    block. One pass, each step past what it read (str.find, anchored matches): linear
    whatever the markup; stops once `limit` characters are out. The result is text to
    escape, never markup."""
    pieces: list[str] = []
    size, position, end = 0, 0, len(markup)

    def add(text: str) -> None:
        nonlocal size
        pieces.append(text)
        size += len(text)

    while position < end and size <= limit:
        opening = markup.find("<", position)
        if opening < 0:
            add(_SPACES.sub(" ", html.unescape(markup[position:])))
            break
        add(_SPACES.sub(" ", html.unescape(markup[position:opening])))
        if markup.startswith("<!--", opening):
            closing = markup.find("-->", opening + 4)
            position = end if closing < 0 else closing + 3
            continue
        tag = _TAG.match(markup, opening)
        if tag is None:
            if markup.startswith(("<!", "<?", "</"), opening):  # a doctype, a bogus comment
                closing = markup.find(">", opening + 2)
                position = end if closing < 0 else closing + 1
            else:  # "a < b": a "<" that starts no tag is text
                add("<")
                position = opening + 1
            continue
        closing = markup.find(">", tag.end())
        if closing < 0:
            break  # a tag cut by the end of the markup
        position = closing + 1
        name = tag.group(2).lower()
        if name in _BLOCKS:
            add("\n")
        elif name in ("td", "th"):
            add(" ")
        if name in _HIDDEN and not tag.group(1):  # "<script/>" opens one too
            hidden_end = _HIDDEN[name].search(markup, position)
            if hidden_end is None:
                break  # never closed: the rest is hidden
            closing = markup.find(">", hidden_end.end())
            position = end if closing < 0 else closing + 1
    lines = "\n".join(" ".join(line.split()) for line in "".join(pieces).split("\n"))
    return _BLANK_LINES.sub("\n\n", lines).strip("\n")
