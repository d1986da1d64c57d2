"""containerd's filter syntax (github.com/containerd/containerd/filters), ported faithfully.

A filter string is a comma separated list of selectors that must all match (AND); several
filter strings are OR'd. A selector is `<fieldpath>[<op><value>]` with op one of `==`, `!=`,
`~=` (regular expression, searched unanchored like Go's MatchString); without an operator it
tests that the field is present. Fields are `[A-Za-z0-9_]+` or double-quoted; values are
`[^\\s,]+` or quoted ("...", and also /.../ or |...| after `~=`). The scanner quirks of the Go
code are kept (e.g. a space before a comma is an error) so that a filter containerd accepts is
accepted here and one it rejects is rejected here.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from snapshotter.core.errors import InvalidArgument

# An adaptor answers (value, present) for a field path of the object being filtered.
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

_EOF = "\x00EOF"  # sentinel "runes": never equal to a one-character string
_ILLEGAL = "\x00ILLEGAL"


class _Tok(enum.Enum):
    EOF = "EOF"
    QUOTED = "Quoted"
    VALUE = "Value"
    FIELD = "Field"
    SEPARATOR = "Separator"
    OPERATOR = "Operator"
    ILLEGAL = "Illegal"
    OTHER = "Other"


class _Op(enum.Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


class FilterSyntaxError(ValueError):
    pass


class Filter:
    def match(self, adaptor: Adaptor) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class _Always(Filter):
    def match(self, adaptor: Adaptor) -> bool:
        return True


ALWAYS: Filter = _Always()


@dataclass(frozen=True)
class _Any(Filter):
    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return any(f.match(adaptor) for f in self.filters)


@dataclass(frozen=True)
class _All(Filter):
    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(f.match(adaptor) for f in self.filters)


@dataclass(frozen=True)
class _Selector(Filter):
    fieldpath: tuple[str, ...]
    operator: _Op
    value: str = ""
    regex: re.Pattern[str] | None = field(default=None, compare=False)

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator is _Op.PRESENT:
            return present
        if self.operator is _Op.EQUAL:
            return present and value == self.value
        if self.operator is _Op.NOT_EQUAL:
            return value != self.value  # absent counts as "" (Go does the same)
        if self.regex is None:  # did not compile: Go logs and matches nothing
            return False
        return self.regex.search(value) is not None


def _is_field_rune(ch: str) -> bool:
    return ch == "_" or ("A" <= ch <= "Z") or ("a" <= ch <= "z") or ("0" <= ch <= "9")


def _is_value_rune(ch: str) -> bool:
    return len(ch) == 1 and ch != "," and not ch.isspace() and ch.isprintable()


def _digit_val(ch: str) -> int:
    if len(ch) == 1 and ch in "0123456789abcdefABCDEF":
        return int(ch, 16)
    return 16


class _Scanner:
    def __init__(self, text: str) -> None:
        self.input = text
        self.pos = 0
        self.ppos = 0
        self.value = False
        self.err = ""

    def next(self) -> str:
        if self.pos >= len(self.input):
            return _EOF
        self.pos = self.ppos
        if self.ppos >= len(self.input):
            return _EOF
        ch = self.input[self.ppos]
        self.ppos += 1
        if ch == "\x00":
            self.error("unexpected null")
            return _ILLEGAL
        return ch

    def peek(self) -> str:
        pos, ppos = self.pos, self.ppos
        ch = self.next()
        self.pos, self.ppos = pos, ppos
        return ch

    def scan(self) -> tuple[int, _Tok, str]:
        ch = self.next()
        pos = self.pos
        while True:
            if ch == _EOF:
                return self.pos, _Tok.EOF, ""
            if ch == _ILLEGAL:
                return self.pos, _Tok.ILLEGAL, ""
            if ch in ("/", "|", '"'):
                if not self._scan_quoted(ch):
                    return pos, _Tok.ILLEGAL, self.input[pos : self.ppos]
                return pos, _Tok.QUOTED, self.input[pos : self.ppos]
            if ch in (",", "."):
                self.value = False
                return pos, _Tok.SEPARATOR, self.input[pos : self.ppos]
            if ch in ("=", "!", "~"):
                while self.peek() in ("=", "!", "~"):
                    self.next()
                self.value = True
                return pos, _Tok.OPERATOR, self.input[pos : self.ppos]
            if ch.isspace():
                ch = self.next()
                pos = self.pos
                continue
            if self.value:
                while _is_value_rune(self.peek()):
                    self.next()
                self.value = False
                return pos, _Tok.VALUE, self.input[pos : self.ppos]
            if _is_field_rune(ch):
                while _is_field_rune(self.peek()):
                    self.next()
                return pos, _Tok.FIELD, self.input[pos : self.ppos]
            return self.pos, _Tok.OTHER, ch

    def _scan_quoted(self, quote: str) -> bool:
        illegal = False
        ch = self.next()
        while ch != quote:
            if ch in ("\n", _EOF, _ILLEGAL):
                self.error("quoted literal not terminated")
                return False
            if ch == "\\":
                ch, legal = self._scan_escape(quote)
                illegal = illegal or not legal
            else:
                ch = self.next()
        return not illegal

    def _scan_escape(self, quote: str) -> tuple[str, bool]:
        ch = self.next()
        if ch in ("a", "b", "f", "n", "r", "t", "v", "\\", quote):
            return self.next(), True
        if ch in ("0", "1", "2", "3", "4", "5", "6", "7"):
            return self._scan_digits(ch, 8, 3)
        widths = {"x": 2, "u": 4, "U": 8}
        if ch in widths:
            return self._scan_digits(self.next(), 16, widths[ch])
        self.error("illegal escape sequence")
        return ch, False

    def _scan_digits(self, ch: str, base: int, n: int) -> tuple[str, bool]:
        while n > 0 and _digit_val(ch) < base:
            ch = self.next()
            n -= 1
        if n > 0:
            self.error("illegal numeric escape sequence")
            return ch, False
        return ch, True

    def error(self, msg: str) -> None:
        if not self.err:
            self.err = msg


def _unquote(quoted: str) -> str:
    """Go's strconv-style unquoting, extended to / and | quotes (filters/quote.go)."""
    if len(quoted) < 2 or quoted[0] != quoted[-1] or quoted[0] not in "\"'/|":
        raise FilterSyntaxError("quote syntax error")
    quote, body = quoted[0], quoted[1:-1]
    if "\n" in body:
        raise FilterSyntaxError("quote syntax error")
    if "\\" not in body and quote not in body:
        return body
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == quote:
            raise FilterSyntaxError("quote syntax error")
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= len(body):
            raise FilterSyntaxError("quote syntax error")
        esc = body[i + 1]
        i += 2
        simple = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92}
        if esc in simple:
            out.append(simple[esc])
        elif esc in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i : i + width]
            if len(digits) < width or any(_digit_val(d) >= 16 for d in digits):
                raise FilterSyntaxError("quote syntax error")
            code = int(digits, 16)
            i += width
            if esc == "x":
                out.append(code)  # a raw byte, as in Go
            elif code > 0x10FFFF:
                raise FilterSyntaxError("quote syntax error")
            else:
                out += chr(code).encode("utf-8", "surrogatepass")
        elif esc in "01234567":
            digits = body[i : i + 2]
            if len(digits) < 2 or any(d not in "01234567" for d in digits):
                raise FilterSyntaxError("quote syntax error")
            code = int(esc + digits, 8)
            i += 2
            if code > 255:
                raise FilterSyntaxError("quote syntax error")
            out.append(code)
        elif esc in ("'", '"', "|", "/") and esc == quote:
            out += esc.encode()
        else:
            raise FilterSyntaxError("quote syntax error")
    return out.decode("utf-8", "replace")


class _Parser:
    def __init__(self, text: str) -> None:
        self.input = text
        self.scanner = _Scanner(text)

    def _error(self, pos: int, msg: str) -> FilterSyntaxError:
        if pos < len(self.input):
            where = f"[{self.input[:pos]} >|{self.input[pos]}|< {self.input[pos + 1 :]}]"
        else:
            where = f"[{self.input}]"
        return FilterSyntaxError(f"filters: parse error: {where}: {msg}")

    def parse(self) -> Filter:
        selectors = [self._selector()]
        while True:
            ch = self.scanner.peek()
            if ch == ",":
                pos, tok, _ = self.scanner.scan()
                if tok is not _Tok.SEPARATOR:
                    raise self._error(pos, "expected a separator")
                selectors.append(self._selector())
            elif ch == _EOF:
                return _All(tuple(selectors))
            else:
                shown = "" if ch in (_ILLEGAL,) else ch
                raise self._error(self.scanner.ppos, f"unexpected input: {shown}")

    def _selector(self) -> _Selector:
        fieldpath = self._fieldpath()
        if self.scanner.peek() in (",", _EOF):
            return _Selector(fieldpath, _Op.PRESENT)
        op = self._operator()
        value = self._value(allow_alt_quotes=op is _Op.MATCHES)
        regex = None
        if op is _Op.MATCHES:
            try:
                regex = re.compile(value)
            except re.error:
                regex = None
        return _Selector(fieldpath, op, value, regex)

    def _fieldpath(self) -> tuple[str, ...]:
        fields = [self._field()]
        while self.scanner.peek() == ".":
            pos, tok, _ = self.scanner.scan()
            if tok is not _Tok.SEPARATOR:
                raise self._error(pos, "expected a field separator (`.`)")
            fields.append(self._field())
        return tuple(fields)

    def _field(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok is _Tok.FIELD:
            return text
        if tok is _Tok.QUOTED:
            return self._unquote(pos, text, allow_alts=False)
        if tok is _Tok.ILLEGAL:
            raise self._error(pos, self.scanner.err)
        raise self._error(pos, "expected field or quoted")

    def _operator(self) -> _Op:
        pos, tok, text = self.scanner.scan()
        if tok is _Tok.OPERATOR:
            ops = {"==": _Op.EQUAL, "!=": _Op.NOT_EQUAL, "~=": _Op.MATCHES}
            if text in ops:
                return ops[text]
            raise self._error(pos, f"unsupported operator {text!r}")
        if tok is _Tok.ILLEGAL:
            raise self._error(pos, self.scanner.err)
        raise self._error(pos, 'expected an operator ("=="|"!="|"~=")')

    def _value(self, allow_alt_quotes: bool) -> str:
        pos, tok, text = self.scanner.scan()
        if tok in (_Tok.VALUE, _Tok.FIELD):
            return text
        if tok is _Tok.QUOTED:
            return self._unquote(pos, text, allow_alts=allow_alt_quotes)
        if tok is _Tok.ILLEGAL:
            raise self._error(pos, self.scanner.err)
        if tok is _Tok.EOF:
            raise FilterSyntaxError(f"filters: [{self.input}]: unexpected EOF")
        raise self._error(pos, "expected value or quoted")

    def _unquote(self, pos: int, text: str, allow_alts: bool) -> str:
        if not allow_alts and text[0] not in ("'", '"'):
            raise self._error(pos, "invalid quote encountered")
        try:
            return _unquote(text)
        except FilterSyntaxError as err:
            raise self._error(pos, f"unquoting failed: {err}") from None


def parse(text: str) -> Filter:
    """Parse one filter string (its selectors are AND'd); "" matches everything."""
    if text == "":
        return ALWAYS
    return _Parser(text).parse()


def parse_all(texts: Sequence[str]) -> Filter:
    """Parse several filter strings, OR'd. Raises InvalidArgument naming the bad filter."""
    if not texts:
        return ALWAYS
    parsed = []
    for text in texts:
        try:
            parsed.append(parse(text))
        except FilterSyntaxError as err:
            raise InvalidArgument(f"invalid filter {text!r}: {err}") from None
    return _Any(tuple(parsed))
