"""Load and validate a course source: a folder or one JSON file. Pure: no database.

A folder holds ``course.yaml`` (``key``, ``title``, optional ``description``,
``modules``, ``unlock`` and ``mode``) and one Markdown file per topic, each opening
with YAML front matter (``module``, ``position``, ``title``, optional ``key``). A
JSON file holds the same course with its topics in a ``topics`` list.

``modules`` maps each module number to its title, or to ``{title, requires, mode}``:
``requires`` lists the modules a learner must complete before this one unlocks, and
``mode`` (``answer`` or ``hint``) overrides the course's. ``unlock`` is ``open``
(every module, the default) or ``sequential`` (each module once the one before is
complete, unless its ``requires`` says otherwise); see ``rag/learners/progress.py``.

Everything is checked before anything is returned, so an import either gets a
complete, consistent :class:`CourseSource` or one :class:`CourseSourceError`
naming the file and the problem. Unknown fields are refused so a typo such as
``positon`` cannot silently drop a value.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import stat
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import msgspec
import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode

from rag.platform.errors import CourseSourceError

#: Largest file read, in bytes; course text is far smaller, anything bigger is a mistake.
MAX_FILE_BYTES = 2 * 1024 * 1024
#: Same rule as the ``courses.course_key`` CHECK constraint; topic keys follow it too.
KEY_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
#: ``module_number`` and ``position`` are PostgreSQL ``integer`` columns.
_MAX_INT = 2**31 - 1

_KEY_RULE = "1 to 64 lowercase letters, digits or '-', starting with a letter or digit"
_COURSE_FIELDS = ("key", "title", "description", "modules", "unlock", "mode")
_MODULE_FIELDS = ("title", "requires", "mode")
UNLOCK_RULES = ("open", "sequential")
MODES = ("answer", "hint")
_FRONT_MATTER_FIELDS = ("key", "module", "position", "title")
_JSON_COURSE_FIELDS = (*_COURSE_FIELDS, "topics")
_JSON_TOPIC_FIELDS = ("key", "module", "position", "title", "body")


class TopicSource(msgspec.Struct, frozen=True):
    """One topic as the source states it; ``body`` has LF line endings."""

    key: str
    module: int
    position: int
    title: str
    body: str
    #: sha256 of (module, position, title, body): equal hashes mean nothing to re-import.
    content_hash: str
    #: File the topic came from (relative to the course folder, or the JSON file name).
    source_file: str


class ModuleRule(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a module's entry in ``modules`` says beyond its title."""

    #: Modules to complete before this one unlocks; None: the course's ``unlock`` decides.
    requires: list[int] | None = None
    #: ``answer`` or ``hint``; None: the course's mode.
    mode: str | None = None


class CourseSource(msgspec.Struct, frozen=True):
    """A validated course; ``topics`` are sorted by (module, position)."""

    key: str
    title: str
    description: str
    modules: dict[int, str]
    topics: list[TopicSource]
    #: ``open`` or ``sequential``.
    unlock: str = "open"
    #: ``answer`` or ``hint``: how the assistant helps in this course.
    mode: str = "answer"
    #: The modules whose entry says more than a title.
    module_rules: dict[int, ModuleRule] = msgspec.field(default_factory=dict)


def content_hash(module: int, position: int, title: str, body: str) -> str:
    """The hash stored with a topic; a JSON array keeps field boundaries unambiguous."""
    return hashlib.sha256(msgspec.json.encode([module, position, title, body])).hexdigest()


def load_course(path: str | os.PathLike[str]) -> CourseSource:
    """Read a course folder or ``.json`` file; raise :class:`CourseSourceError` on any problem."""
    given = os.fspath(path)
    p = Path(given)
    if p.is_dir():
        return _load_folder(p, given)
    if not p.exists():
        raise CourseSourceError(given, "does not exist")
    if p.is_file() and p.suffix.lower() == ".json":
        return _load_json(p)
    raise CourseSourceError(
        given, "is neither a folder (course.yaml + Markdown topics) nor a .json file"
    )


# --- folder ---------------------------------------------------------------------------


def _load_folder(root: Path, given: str) -> CourseSource:
    course_file = root / "course.yaml"
    if not course_file.exists():
        raise CourseSourceError(
            "course.yaml",
            f"is missing: the course folder {given} needs a course.yaml "
            "with at least 'key' and 'title'",
        )
    data = _parse_yaml("course.yaml", _read_text(course_file, "course.yaml"), first_line=1)
    if data is None:
        raise CourseSourceError("course.yaml", "is empty: it needs at least 'key' and 'title'")
    fields = _Fields("course.yaml", "the course", data, _COURSE_FIELDS)
    key = fields.key("key")
    title = fields.text("title")
    description = fields.optional_text("description")
    modules, rules = _modules(fields)
    unlock = fields.choice("unlock", UNLOCK_RULES, "open")
    mode = fields.choice("mode", MODES, "answer")

    topics = [_load_topic_file(root, rel) for rel in _topic_files(root)]
    if not topics:
        raise CourseSourceError(
            given, "has no topics: add one Markdown file (*.md with front matter) per topic"
        )
    entries = [(t, t.source_file) for t in topics]
    _check_unique(entries, one_file=False)
    _check_modules(entries, modules, "course.yaml", one_file=False)
    return CourseSource(key, title, description, modules, _ordered(topics), unlock, mode, rules)


def _topic_files(root: Path) -> list[str]:
    """Topic files relative to ``root``, as sorted POSIX paths."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden and underscore folders (.git, _drafts) follow the same rule as files.
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.lower().endswith(".md") or name.startswith((".", "_")):
                continue
            if rel_dir == Path(".") and name.lower() == "readme.md":
                continue
            found.append((rel_dir / name).as_posix())
    return sorted(found)


def _load_topic_file(root: Path, rel: str) -> TopicSource:
    text = _read_text(root / rel, rel)
    lines = text.split("\n")
    if lines[0].rstrip() != "---":
        raise CourseSourceError(
            rel,
            "has no front matter: the first line must be '---', followed by "
            "module, position and title, then a closing '---' line",
        )
    close = next((i for i in range(1, len(lines)) if lines[i].rstrip() == "---"), None)
    if close is None:
        raise CourseSourceError(
            rel, "front matter opened on line 1 is never closed by a '---' line"
        )
    data = _parse_yaml(rel, "\n".join(lines[1:close]), first_line=2)
    if data is None:
        raise CourseSourceError(rel, "front matter is empty: it needs module, position and title")
    fields = _Fields(rel, "front matter", data, _FRONT_MATTER_FIELDS)
    module = fields.number("module")
    position = fields.number("position")
    title = fields.text("title")
    if fields.data.get("key") is not None:
        key = fields.key("key")
    else:
        key = Path(rel).stem
        if not KEY_PATTERN.fullmatch(key):
            raise CourseSourceError(
                rel,
                f"the topic key defaults to the file name {key!r}, which is not a valid key "
                f"({_KEY_RULE}): rename the file or set 'key' in the front matter",
            )
    body = _trim_blank_lines("\n".join(lines[close + 1 :]))
    if not body.strip():
        raise CourseSourceError(rel, "the topic body after the front matter is empty")
    return _topic(key, module, position, title, body, rel)


# --- JSON -----------------------------------------------------------------------------


def _load_json(p: Path) -> CourseSource:
    name = p.name
    text = _read_text(p, name)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise CourseSourceError(
            name, f"JSON syntax error on line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except _DuplicateKey as exc:
        raise CourseSourceError(name, f"an object has the key {exc.args[0]!r} twice") from None
    except RecursionError:
        raise CourseSourceError(name, "is nested too deeply to be a course") from None
    if not isinstance(data, dict):
        raise CourseSourceError(
            name, f"must hold a JSON object with key, title and topics, not {_describe(data)}"
        )
    fields = _Fields(name, "the course", data, _JSON_COURSE_FIELDS)
    key = fields.key("key")
    title = fields.text("title")
    description = fields.optional_text("description")
    modules, rules = _modules(fields)
    unlock = fields.choice("unlock", UNLOCK_RULES, "open")
    mode = fields.choice("mode", MODES, "answer")
    raw_topics = fields.require("topics")
    if not isinstance(raw_topics, list):
        raise CourseSourceError(name, f"'topics' must be a list, not {_describe(raw_topics)}")
    if not raw_topics:
        raise CourseSourceError(name, "'topics' is empty: a course needs at least one topic")

    entries: list[tuple[TopicSource, str]] = []
    for i, raw in enumerate(raw_topics):
        where = f"topics[{i}]"
        if not isinstance(raw, dict):
            raise CourseSourceError(name, f"{where} must be an object, not {_describe(raw)}")
        t = _Fields(name, where, raw, _JSON_TOPIC_FIELDS)
        tkey = t.key("key")
        module = t.number("module")
        position = t.number("position")
        ttitle = t.text("title")
        raw_body = t.require("body")
        if not isinstance(raw_body, str):
            raise CourseSourceError(
                name, f"{where} field 'body' must be a string, not {_describe(raw_body)}"
            )
        body = _trim_blank_lines(_lf(t.checked("body", raw_body)))
        if not body.strip():
            raise CourseSourceError(name, f"{where} ({tkey!r}) has an empty body")
        entries.append((_topic(tkey, module, position, ttitle, body, name), f"{where} ({tkey!r})"))
    _check_unique(entries, one_file=True)
    _check_modules(entries, modules, "the course", one_file=True)
    topics = _ordered([t for t, _ in entries])
    return CourseSource(key, title, description, modules, topics, unlock, mode, rules)


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; a duplicate is a mistake worth reporting.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


# --- shared checks --------------------------------------------------------------------


def _topic(key: str, module: int, position: int, title: str, body: str, file: str) -> TopicSource:
    return TopicSource(
        key, module, position, title, body, content_hash(module, position, title, body), file
    )


def _ordered(topics: list[TopicSource]) -> list[TopicSource]:
    return sorted(topics, key=lambda t: (t.module, t.position))


def _check_modules(
    entries: list[tuple[TopicSource, str]], modules: dict[int, str], where: str, *, one_file: bool
) -> None:
    """A course that lists its modules lists every module its topics are in: a topic in
    an unlisted one is almost always a typo in its ``module`` (a course without
    ``modules`` has untitled modules, and no list to check against)."""
    if not modules:
        return
    for t, label in entries:
        if t.module not in modules:
            listed = ", ".join(str(n) for n in sorted(modules))
            prefix = f"{label}: " if one_file else ""
            raise CourseSourceError(
                t.source_file,
                f"{prefix}topic {t.key!r} is in module {t.module}, which {where}'s 'modules' "
                f"does not list (it lists {listed}): add the module there, or fix the "
                "topic's module",
            )


def _check_unique(entries: list[tuple[TopicSource, str]], *, one_file: bool) -> None:
    """Refuse two topics with the same (module, position) or the same key, naming both.

    ``entries`` pairs each topic with how messages name it: its file in a
    folder, its ``topics[i]`` entry in a JSON file (``one_file``).
    """
    slots: dict[tuple[int, int], str] = {}
    keys: dict[str, str] = {}
    for t, label in entries:
        prefix = f"{label}: " if one_file else ""
        other = slots.setdefault((t.module, t.position), label)
        if other != label:
            raise CourseSourceError(
                t.source_file,
                f"{prefix}module {t.module}, position {t.position} is also "
                f"used by {other}: positions must be unique within a module",
            )
        twin = keys.setdefault(t.key, label)
        if twin != label:
            raise CourseSourceError(
                t.source_file,
                f"{prefix}topic key {t.key!r} is also used by {twin}: "
                "topic keys must be unique within a course",
            )


def _modules(fields: _Fields) -> tuple[dict[int, str], dict[int, ModuleRule]]:
    """``modules`` as {number: title} and the rules of those that have any; JSON (and
    quoted YAML) keys arrive as strings. A ``requires`` names listed modules only,
    never its own, and the requirements form no cycle (a module no one could unlock)."""
    raw = fields.data.get("modules")
    if raw is None:
        return {}, {}
    file, where = fields.file, fields.where
    if not isinstance(raw, dict):
        raise CourseSourceError(
            file,
            f"{where} field 'modules' must be a mapping of module "
            f"number to title, not {_describe(raw)}",
        )
    out: dict[int, str] = {}
    rules: dict[int, ModuleRule] = {}
    for k, v in raw.items():
        number: int | None = None
        if isinstance(k, int) and not isinstance(k, bool):
            number = k
        elif isinstance(k, str) and re.fullmatch(r"[0-9]{1,10}", k.strip()):
            number = int(k)
        if number is None or not 1 <= number <= _MAX_INT:
            raise CourseSourceError(
                file,
                f"{where} 'modules' has the key {k!r}: module numbers "
                "must be whole numbers of at least 1",
            )
        if number in out:
            raise CourseSourceError(file, f"{where} 'modules' lists module {number} twice")
        if isinstance(v, dict):
            entry = _Fields(file, f"{where} 'modules' entry {number}", v, _MODULE_FIELDS)
            out[number] = entry.text("title")
            rule = ModuleRule(_requires(entry, number), entry.choice("mode", MODES, None))
            if rule != ModuleRule():
                rules[number] = rule
            continue
        if not isinstance(v, str) or not v.strip():
            raise CourseSourceError(
                file,
                f"{where} 'modules' entry {number} must be a non-empty title (or a mapping "
                f"with title, requires, mode), not {_describe(v)}",
            )
        out[number] = fields.checked(f"modules.{number}", v.strip())
    for number, rule in rules.items():
        unknown = [n for n in rule.requires or [] if n not in out]
        if unknown:
            raise CourseSourceError(
                file,
                f"{where} module {number} requires module {unknown[0]}, which 'modules' "
                "does not list",
            )
    cycle = _requirement_cycle(rules)
    if cycle:
        chain = " -> ".join(str(n) for n in cycle)
        raise CourseSourceError(
            file,
            f"{where} modules require each other in a circle ({chain}): no learner "
            "could ever unlock them",
        )
    return dict(sorted(out.items())), dict(sorted(rules.items()))


def _requires(entry: _Fields, number: int) -> list[int] | None:
    raw = entry.data.get("requires")
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= _MAX_INT for n in raw
    ):
        raise entry.fail("requires", "a list of module numbers", raw)
    if number in raw:
        raise CourseSourceError(
            entry.file, f"{entry.where} requires itself: list the modules before it"
        )
    return sorted(set(raw))


def _requirement_cycle(rules: dict[int, ModuleRule]) -> list[int]:
    """A cycle of ``requires`` as [a, b, ..., a], or [] (a depth-first search)."""
    state: dict[int, int] = {}  # 1: on the current path, 2: done

    def visit(n: int, path: list[int]) -> list[int]:
        state[n] = 1
        for m in rules.get(n, ModuleRule()).requires or []:
            if state.get(m) == 1:
                return [*path[path.index(m) :], m] if m in path else [n, m]
            if state.get(m) is None:
                found = visit(m, [*path, m])
                if found:
                    return found
        state[n] = 2
        return []

    for n in rules:
        if state.get(n) is None:
            found = visit(n, [n])
            if found:
                return found
    return []


class _Fields:
    """A parsed mapping under validation; every error names the file and where in it."""

    def __init__(self, file: str, where: str, data: Any, allowed: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise CourseSourceError(
                file,
                f"{where} must be a mapping of fields "
                f"({', '.join(allowed)}), not {_describe(data)}",
            )
        self.file, self.where, self.data = file, where, data
        for name in data:
            if name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise CourseSourceError(
                    file,
                    f"{where} has an unknown field {name!r}{hint}; "
                    f"allowed fields: {', '.join(allowed)}",
                )

    def fail(self, name: str, expected: str, value: Any) -> CourseSourceError:
        return CourseSourceError(
            self.file, f"{self.where} field {name!r} must be {expected}, not {_describe(value)}"
        )

    def require(self, name: str) -> Any:
        if name not in self.data:
            raise CourseSourceError(
                self.file, f"{self.where} is missing the required field {name!r}"
            )
        value = self.data[name]
        if value is None:
            raise CourseSourceError(self.file, f"{self.where} field {name!r} has no value")
        return value

    def checked(self, name: str, value: str) -> str:
        """``value`` unless it holds text PostgreSQL or UTF-8 cannot store."""
        if "\x00" in value:
            raise CourseSourceError(
                self.file, f"{self.where} field {name!r} contains a NUL character (\\u0000)"
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise CourseSourceError(
                self.file,
                f"{self.where} field {name!r} contains an unpaired surrogate "
                "escape (such as \\ud800), which is not valid text",
            ) from None
        return value

    def text(self, name: str) -> str:
        value = self.require(name)
        if not isinstance(value, str):
            raise self.fail(
                name, "a string (quote it if it looks like a number, date or yes/no)", value
            )
        if not value.strip():
            raise CourseSourceError(self.file, f"{self.where} field {name!r} is empty")
        return self.checked(name, _lf(value.strip()))

    def optional_text(self, name: str) -> str:
        value = self.data.get(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.fail(name, "a string", value)
        return self.checked(name, _lf(value.strip()))

    def choice(self, name: str, allowed: tuple[str, ...], default: str | None) -> Any:
        """One of ``allowed``, or ``default`` when the field is absent or null."""
        value = self.data.get(name)
        if value is None:
            return default
        if value not in allowed:
            raise self.fail(name, " or ".join(repr(a) for a in allowed), value)
        return value

    def number(self, name: str) -> int:
        value = self.require(name)
        # bool is an int subclass: `module: true` must not become module 1.
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= _MAX_INT:
            raise self.fail(name, "a whole number of at least 1", value)
        return value

    def key(self, name: str) -> str:
        value = self.require(name)
        if not isinstance(value, str):
            raise self.fail(name, f"a key ({_KEY_RULE})", value)
        if not KEY_PATTERN.fullmatch(value):
            raise CourseSourceError(
                self.file,
                f"{self.where} field {name!r} is {value!r}, which is not a valid key: "
                f"use {_KEY_RULE}",
            )
        return value


def _describe(value: Any) -> str:
    """A value as a message names it: the string 'two', true, a list..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"the {type(value).__name__} {value}"


# --- reading --------------------------------------------------------------------------


def _read_text(path: Path, file: str) -> str:
    """A file's text, refusing what is too big, holds NUL bytes or is not UTF-8; LF endings."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise CourseSourceError(file, "is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise _too_big(file, info.st_size)
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # the file may have grown since stat
    except OSError as exc:
        raise CourseSourceError(file, f"cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise _too_big(file, len(raw))
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise CourseSourceError(
            file,
            f"contains a NUL byte at byte offset {nul} (line {_line_of(raw, nul)}): "
            "course files must be UTF-8 text (is it UTF-16 or binary?)",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CourseSourceError(
            file,
            f"is not valid UTF-8: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} "
            f"(line {_line_of(raw, exc.start)}); save the file as UTF-8",
        ) from None
    # Editors on Windows add a BOM and CRLF endings; neither should change the content hash.
    return _lf(text.removeprefix("\ufeff"))


def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _too_big(file: str, size: int) -> CourseSourceError:
    return CourseSourceError(
        file, f"is {size} bytes; the limit is {MAX_FILE_BYTES} bytes (2 MB) per file"
    )


def _lf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _trim_blank_lines(text: str) -> str:
    """Drop blank lines at both ends; the first line's indentation and inner text stay as is."""
    text = re.sub(r"\A(?:[^\S\n]*\n)+", "", text)
    return re.sub(r"(?:\n[^\S\n]*)+\Z", "", text)


# --- YAML -----------------------------------------------------------------------------

_INT_TAG = "tag:yaml.org,2002:int"


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and reads integers as plain decimal.

    YAML 1.1 would read ``position: 010`` as 8 (octal) and ``1:30`` as 90
    (base 60), and silently keep the last of two ``title:`` lines.
    """

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    raise ConstructorError(
                        None, None, f"the key {key_node.value!r} appears twice", key_node.start_mark
                    )
                seen.add(ident)
        return super().construct_mapping(node, deep)


def _construct_decimal(loader: yaml.SafeLoader, node: ScalarNode) -> int:
    raw = str(loader.construct_scalar(node))
    try:
        return int(raw, 10)
    except ValueError:
        raise ConstructorError(
            None, None, f"{raw!r} is not a decimal whole number", node.start_mark
        ) from None


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _INT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT_TAG, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Loader.add_constructor(_INT_TAG, _construct_decimal)


def _parse_yaml(file: str, text: str, *, first_line: int) -> Any:
    """Parse one YAML document; ``first_line`` is the file line the text starts on."""
    try:
        # yaml.load with a SafeLoader subclass is as safe as yaml.safe_load.
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" on line {mark.line + first_line}" if mark is not None else ""
        what = " ".join(s for s in (exc.context, exc.problem) if s) or "invalid YAML"
        raise CourseSourceError(file, f"YAML syntax error{where}: {what}") from None
    except yaml.YAMLError as exc:
        raise CourseSourceError(file, f"YAML syntax error: {exc}") from None
    except RecursionError:
        raise CourseSourceError(file, "YAML is nested too deeply to be course metadata") from None
