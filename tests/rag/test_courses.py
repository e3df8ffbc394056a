"""Loading and validating course sources (folders and JSON files)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from rag.content.courses import MAX_FILE_BYTES, CourseSource, TopicSource, content_hash, load_course
from rag.platform.errors import CourseSourceError

DEMO = Path(__file__).resolve().parents[2] / "courses" / "demo"

COURSE_YAML = """\
key: bread-basics
title: Bread Basics
description: A short course.
modules:
  1: Ingredients
  2: Process
"""


# --- factories ------------------------------------------------------------------------


def topic_md(module: Any = 1, position: Any = 1, title: str = "A topic",
             body: str = "Some body text.", extra: str = "") -> str:
    """A topic file's text; ``extra`` is added to the front matter verbatim."""
    return (f"---\nmodule: {module}\nposition: {position}\ntitle: {title}\n{extra}---\n\n"
            f"{body}\n")


def write_course(root: Path, topics: dict[str, str] | None = None,
                 course_yaml: str | None = COURSE_YAML) -> Path:
    """A course folder: ``course.yaml`` (unless None) and ``{relative path: text}`` files."""
    root.mkdir(parents=True, exist_ok=True)
    if course_yaml is not None:
        (root / "course.yaml").write_text(course_yaml, encoding="utf-8")
    if topics is None:
        topics = {"01-01-flour.md": topic_md(1, 1, "Flour", "Flour is milled grain.")}
    for rel, text in topics.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    return root


def json_course(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "key": "bread-basics",
        "title": "Bread Basics",
        "modules": {"1": "Ingredients"},
        "topics": [
            {"key": "salt", "module": 1, "position": 2, "title": "Salt", "body": "Salt tightens."},
            {"key": "flour", "module": 1, "position": 1, "title": "Flour", "body": "Flour."},
        ],
    }
    data.update(overrides)
    return data


def write_json(tmp_path: Path, data: Any, name: str = "course.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def refusal(path: Path | str) -> CourseSourceError:
    with pytest.raises(CourseSourceError) as info:
        load_course(path)
    return info.value


def one_topic_folder(tmp_path: Path, text: str, name: str = "01-01-flour.md") -> Path:
    return write_course(tmp_path / "c", {name: text})


def only_topic(course: CourseSource) -> TopicSource:
    assert len(course.topics) == 1
    return course.topics[0]


# --- valid sources --------------------------------------------------------------------


def test_folder_loads_fields_and_orders_topics(tmp_path: Path) -> None:
    root = write_course(tmp_path / "c", {
        "02-01-mixing.md": topic_md(2, 1, "Mixing", "Mix it."),
        "01-02-salt.md": topic_md(1, 2, "Salt", "Salt it.", extra="key: salt-topic\n"),
        "sub/01-01-flour.md": topic_md(1, 1, "Flour", "\n\n  Indented first line.\n\nMore.\n\n"),
        "README.md": "Not a topic.",
        "_draft.md": "Not a topic.",
        ".hidden.md": "Not a topic.",
        "_drafts/01-09-x.md": topic_md(1, 9),
        "notes.txt": "Not a topic.",
    })
    course = load_course(root)
    assert (course.key, course.title, course.description) == (
        "bread-basics", "Bread Basics", "A short course.")
    assert course.modules == {1: "Ingredients", 2: "Process"}
    assert [(t.module, t.position) for t in course.topics] == [(1, 1), (1, 2), (2, 1)]
    flour, salt, mixing = course.topics
    assert flour.key == "01-01-flour" and flour.source_file == "sub/01-01-flour.md"
    # Only blank lines are trimmed: the first line keeps its indentation.
    assert flour.body == "  Indented first line.\n\nMore."
    assert salt.key == "salt-topic" and salt.title == "Salt" and salt.body == "Salt it."
    assert mixing.content_hash == content_hash(2, 1, "Mixing", "Mix it.")
    assert re.fullmatch(r"[0-9a-f]{64}", mixing.content_hash)


def test_course_yaml_optional_fields_default(tmp_path: Path) -> None:
    root = write_course(tmp_path / "c", course_yaml="key: k\ntitle: T\n")
    course = load_course(str(root))
    assert course.description == "" and course.modules == {}


def test_json_loads_fields_and_orders_topics(tmp_path: Path) -> None:
    course = load_course(write_json(tmp_path, json_course(description="About bread.")))
    assert course.key == "bread-basics" and course.description == "About bread."
    assert course.modules == {1: "Ingredients"}
    assert [t.key for t in course.topics] == ["flour", "salt"]
    assert {t.source_file for t in course.topics} == {"course.json"}


def test_json_and_folder_hash_the_same_content_alike(tmp_path: Path) -> None:
    root = write_course(tmp_path / "c", {"flour.md": topic_md(1, 1, "Flour", "Flour.")})
    data = json_course(topics=[{"key": "flour", "module": 1, "position": 1, "title": "Flour",
                                "body": "Flour.\r\n"}])
    folder, from_json = load_course(root), load_course(write_json(tmp_path, data))
    assert folder.topics[0].content_hash == from_json.topics[0].content_hash


# --- content hash ---------------------------------------------------------------------


def hash_of(tmp_path: Path, name: str, text: str) -> str:
    return only_topic(load_course(one_topic_folder(tmp_path / name, text))).content_hash


def test_content_hash_follows_body_title_and_position(tmp_path: Path) -> None:
    base = hash_of(tmp_path, "a", topic_md(1, 1, "Flour", "Body one."))
    assert hash_of(tmp_path, "b", topic_md(1, 1, "Flour", "Body one.")) == base
    assert hash_of(tmp_path, "c", topic_md(1, 1, "Flour", "Body two.")) != base
    assert hash_of(tmp_path, "d", topic_md(1, 1, "Wheat", "Body one.")) != base
    assert hash_of(tmp_path, "e", topic_md(1, 2, "Flour", "Body one.")) != base
    assert hash_of(tmp_path, "f", topic_md(2, 1, "Flour", "Body one.")) != base


def test_content_hash_ignores_crlf_line_endings(tmp_path: Path) -> None:
    text = topic_md(1, 1, "Flour", "Line one.\n\nLine two.")
    lf = load_course(one_topic_folder(tmp_path / "lf", text))
    crlf = load_course(one_topic_folder(tmp_path / "crlf", text.replace("\n", "\r\n")))
    assert only_topic(crlf).body == "Line one.\n\nLine two."
    assert only_topic(crlf).content_hash == only_topic(lf).content_hash


def test_utf8_bom_is_ignored(tmp_path: Path) -> None:
    text = topic_md(1, 1, "Flour", "Body.")
    plain = load_course(one_topic_folder(tmp_path / "a", text))
    bom = load_course(one_topic_folder(tmp_path / "b", "\ufeff" + text))
    assert only_topic(bom).content_hash == only_topic(plain).content_hash


# --- refusals: the path ---------------------------------------------------------------


def test_refuses_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    exc = refusal(missing)
    assert exc.file == str(missing) and "does not exist" in exc.problem


def test_refuses_a_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "course.yaml"
    path.write_text(COURSE_YAML)
    exc = refusal(path)
    assert exc.file == str(path) and "neither a folder" in exc.problem


def test_refuses_folder_without_course_yaml(tmp_path: Path) -> None:
    exc = refusal(write_course(tmp_path / "c", course_yaml=None))
    assert exc.file == "course.yaml" and "is missing" in exc.problem


def test_refuses_folder_without_topics(tmp_path: Path) -> None:
    root = write_course(tmp_path / "c", {"README.md": "Only a readme."})
    exc = refusal(root)
    assert exc.file == str(root) and "no topics" in exc.problem


def test_refuses_a_topic_in_a_module_the_course_does_not_list(tmp_path: Path) -> None:
    root = write_course(tmp_path / "c", {
        "01-01-flour.md": topic_md(1, 1, "Flour"),
        "03-01-crust.md": topic_md(3, 1, "Crust"),  # modules: lists 1 and 2 only
    })
    exc = refusal(root)
    assert exc.file == "03-01-crust.md"
    assert exc.problem == (
        "topic '03-01-crust' is in module 3, which course.yaml's 'modules' does not list "
        "(it lists 1, 2): add the module there, or fix the topic's module"
    )
    data = json_course()
    data["topics"][1]["module"] = 2  # modules: {"1": ...}
    exc = refusal(write_json(tmp_path, data))
    assert exc.file == "course.json"
    assert exc.problem.startswith("topics[1] ('flour'): topic 'flour' is in module 2, which")
    # A course without a module list has untitled modules: nothing to check against.
    plain = write_course(tmp_path / "plain", {"03-01-crust.md": topic_md(3, 1, "Crust")},
                         course_yaml="key: plain\ntitle: Plain\n")
    assert [t.module for t in load_course(plain).topics] == [3]


# --- refusals: bytes ------------------------------------------------------------------


def test_refuses_invalid_utf8_with_byte_offset(tmp_path: Path) -> None:
    root = write_course(tmp_path / "c")
    (root / "01-01-flour.md").write_bytes(b"---\nmodule: 1\ntitle: caf\xe9\n---\nBody.\n")
    exc = refusal(root)
    assert exc.file == "01-01-flour.md"
    assert "not valid UTF-8" in exc.problem and "byte offset 24" in exc.problem
    assert "line 3" in exc.problem


def test_refuses_nul_byte_in_topic(tmp_path: Path) -> None:
    root = write_course(tmp_path / "c", {"01-01-flour.md": topic_md(body="Bad\x00byte")})
    exc = refusal(root)
    assert exc.file == "01-01-flour.md" and "NUL byte at byte offset" in exc.problem


def test_refuses_nul_byte_in_course_yaml(tmp_path: Path) -> None:
    exc = refusal(write_course(tmp_path / "c", course_yaml="key: k\ntitle: T\x00\n"))
    assert exc.file == "course.yaml" and "NUL byte" in exc.problem


def test_refuses_nul_escape_in_json_string(tmp_path: Path) -> None:
    topics = [{"key": "a", "module": 1, "position": 1, "title": "A", "body": "x\u0000y"}]
    exc = refusal(write_json(tmp_path, json_course(topics=topics)))
    assert exc.file == "course.json" and "NUL character" in exc.problem
    assert "'body'" in exc.problem


def test_refuses_nul_escape_in_yaml_string(tmp_path: Path) -> None:
    exc = refusal(one_topic_folder(tmp_path, topic_md(title='"bad\\0title"')))
    assert exc.file == "01-01-flour.md" and "NUL character" in exc.problem


def test_refuses_lone_surrogate_in_json(tmp_path: Path) -> None:
    path = tmp_path / "course.json"
    path.write_text(json.dumps(json_course(title="T")).replace('"T"', '"\\ud800"'))
    exc = refusal(path)
    assert exc.file == "course.json" and "surrogate" in exc.problem


def test_refuses_file_over_size_cap(tmp_path: Path) -> None:
    body = "word " * (MAX_FILE_BYTES // 5 + 1)
    exc = refusal(one_topic_folder(tmp_path, topic_md(body=body)))
    assert exc.file == "01-01-flour.md" and "limit is" in exc.problem


def test_refuses_json_over_size_cap(tmp_path: Path) -> None:
    big = [{"key": "a", "module": 1, "position": 1, "title": "A", "body": "x" * MAX_FILE_BYTES}]
    exc = refusal(write_json(tmp_path, json_course(topics=big), name="big.json"))
    assert exc.file == "big.json" and "2 MB" in exc.problem


# --- refusals: syntax -----------------------------------------------------------------


def test_refuses_course_yaml_syntax_error_with_line(tmp_path: Path) -> None:
    exc = refusal(write_course(tmp_path / "c", course_yaml="key: k\ntitle: [unclosed\n"))
    assert exc.file == "course.yaml" and "YAML syntax error" in exc.problem
    assert "line" in exc.problem


def test_refuses_front_matter_syntax_error_with_file_line(tmp_path: Path) -> None:
    text = "---\nmodule: 1\nposition: 1\ntitle: A\n  bad: indent\n---\nBody.\n"
    exc = refusal(one_topic_folder(tmp_path, text))
    assert exc.file == "01-01-flour.md" and "YAML syntax error on line 5" in exc.problem


def test_refuses_json_syntax_error_with_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "key": "k",\n  "title": "T",,\n}')
    exc = refusal(path)
    assert exc.file == "broken.json" and "JSON syntax error on line 3" in exc.problem


def test_refuses_duplicate_yaml_field(tmp_path: Path) -> None:
    exc = refusal(one_topic_folder(tmp_path, topic_md(extra="title: Again\n")))
    assert exc.file == "01-01-flour.md" and "'title' appears twice" in exc.problem


def test_refuses_duplicate_json_field(tmp_path: Path) -> None:
    path = tmp_path / "course.json"
    path.write_text('{"key": "k", "key": "k2", "title": "T", "topics": []}')
    exc = refusal(path)
    assert exc.file == "course.json" and "'key' twice" in exc.problem


def test_refuses_topic_without_front_matter(tmp_path: Path) -> None:
    exc = refusal(one_topic_folder(tmp_path, "# Flour\n\nNo front matter here.\n"))
    assert exc.file == "01-01-flour.md" and "no front matter" in exc.problem


def test_refuses_unclosed_front_matter(tmp_path: Path) -> None:
    exc = refusal(one_topic_folder(tmp_path, "---\nmodule: 1\nposition: 1\ntitle: A\nBody.\n"))
    assert exc.file == "01-01-flour.md" and "never closed" in exc.problem


def test_refuses_empty_front_matter(tmp_path: Path) -> None:
    exc = refusal(one_topic_folder(tmp_path, "---\n---\nBody.\n"))
    assert exc.file == "01-01-flour.md" and "front matter is empty" in exc.problem


def test_refuses_front_matter_that_is_not_a_mapping(tmp_path: Path) -> None:
    exc = refusal(one_topic_folder(tmp_path, "---\n- 1\n- 2\n---\nBody.\n"))
    assert exc.file == "01-01-flour.md" and "must be a mapping" in exc.problem


def test_refuses_empty_course_yaml(tmp_path: Path) -> None:
    exc = refusal(write_course(tmp_path / "c", course_yaml="# nothing\n"))
    assert exc.file == "course.yaml" and "is empty" in exc.problem


# --- refusals: fields -----------------------------------------------------------------


@pytest.mark.parametrize("field", ["module", "position", "title"])
def test_refuses_front_matter_missing_required_field(tmp_path: Path, field: str) -> None:
    lines = {"module": "module: 1\n", "position": "position: 1\n", "title": "title: A\n"}
    del lines[field]
    exc = refusal(one_topic_folder(tmp_path, "---\n" + "".join(lines.values()) + "---\nBody.\n"))
    assert exc.file == "01-01-flour.md"
    assert exc.problem == f"front matter is missing the required field {field!r}"


@pytest.mark.parametrize("field", ["key", "title"])
def test_refuses_course_yaml_missing_required_field(tmp_path: Path, field: str) -> None:
    text = "key: k\n" if field == "title" else "title: T\n"
    exc = refusal(write_course(tmp_path / "c", course_yaml=text))
    assert exc.file == "course.yaml" and f"missing the required field {field!r}" in exc.problem


@pytest.mark.parametrize("field", ["key", "title", "topics"])
def test_refuses_json_course_missing_required_field(tmp_path: Path, field: str) -> None:
    data = json_course()
    del data[field]
    exc = refusal(write_json(tmp_path, data))
    assert exc.file == "course.json" and f"missing the required field {field!r}" in exc.problem


@pytest.mark.parametrize("field", ["key", "module", "position", "title", "body"])
def test_refuses_json_topic_missing_required_field(tmp_path: Path, field: str) -> None:
    data = json_course()
    del data["topics"][1][field]
    exc = refusal(write_json(tmp_path, data))
    assert exc.file == "course.json"
    assert f"topics[1] is missing the required field {field!r}" in exc.problem


@pytest.mark.parametrize(("module", "shown"), [
    ("two", "the string 'two'"),
    ("true", "the boolean true"),
    ("0", "the number 0"),
    ("-1", "the number -1"),
    ("1.5", "the number 1.5"),
    ("[1]", "a list"),
    ("", "has no value"),
])
def test_refuses_bad_module_number(tmp_path: Path, module: str, shown: str) -> None:
    exc = refusal(one_topic_folder(tmp_path, topic_md(module=module)))
    assert exc.file == "01-01-flour.md"
    assert "'module'" in exc.problem and shown in exc.problem


def test_reads_leading_zero_numbers_as_decimal(tmp_path: Path) -> None:
    # YAML 1.1 would read 010 as octal 8; authors mean ten.
    course = load_course(one_topic_folder(tmp_path, topic_md(module="02", position="010")))
    assert (only_topic(course).module, only_topic(course).position) == (2, 10)


def test_refuses_bool_position_in_json(tmp_path: Path) -> None:
    data = json_course()
    data["topics"][0]["position"] = True
    exc = refusal(write_json(tmp_path, data))
    assert exc.file == "course.json"
    assert "topics[0] field 'position'" in exc.problem and "boolean" in exc.problem


def test_refuses_non_string_title(tmp_path: Path) -> None:
    exc = refusal(one_topic_folder(tmp_path, topic_md(title="2024-01-01")))
    assert exc.file == "01-01-flour.md" and "'title' must be a string" in exc.problem


def test_refuses_blank_title(tmp_path: Path) -> None:
    exc = refusal(one_topic_folder(tmp_path, topic_md(title='"   "')))
    assert exc.file == "01-01-flour.md" and "'title' is empty" in exc.problem


def test_refuses_non_string_description(tmp_path: Path) -> None:
    exc = refusal(write_course(tmp_path / "c", course_yaml="key: k\ntitle: T\ndescription: [1]\n"))
    assert exc.file == "course.yaml" and "'description' must be a string" in exc.problem


@pytest.mark.parametrize("modules", ["[a, b]", "{zero: A}", "{0: A}", "{1: ''}", "{1: A, '1': B}"])
def test_refuses_bad_modules(tmp_path: Path, modules: str) -> None:
    text = f"key: k\ntitle: T\nmodules: {modules}\n"
    exc = refusal(write_course(tmp_path / "c", course_yaml=text))
    assert exc.file == "course.yaml" and "modules" in exc.problem


@pytest.mark.parametrize("key", ["Bread", "-bread", "bread_science", "a" * 65, "bread\n"])
def test_refuses_bad_course_key(tmp_path: Path, key: str) -> None:
    exc = refusal(write_json(tmp_path, json_course(key=key)))
    assert exc.file == "course.json" and "not a valid key" in exc.problem


def test_refuses_bad_topic_key_in_front_matter(tmp_path: Path) -> None:
    exc = refusal(one_topic_folder(tmp_path, topic_md(extra="key: Flour Power\n")))
    assert exc.file == "01-01-flour.md" and "'Flour Power'" in exc.problem
    assert "not a valid key" in exc.problem


def test_refuses_file_name_that_is_not_a_valid_default_key(tmp_path: Path) -> None:
    exc = refusal(one_topic_folder(tmp_path, topic_md(), name="Flour Basics.md"))
    assert exc.file == "Flour Basics.md"
    assert "defaults to the file name 'Flour Basics'" in exc.problem


def test_refuses_unknown_front_matter_field_with_suggestion(tmp_path: Path) -> None:
    text = "---\nmodule: 1\npositon: 1\ntitle: A\n---\nBody.\n"
    exc = refusal(one_topic_folder(tmp_path, text))
    assert exc.file == "01-01-flour.md"
    assert "unknown field 'positon'" in exc.problem and "did you mean 'position'" in exc.problem


def test_refuses_unknown_course_yaml_field(tmp_path: Path) -> None:
    exc = refusal(write_course(tmp_path / "c", course_yaml=COURSE_YAML + "author: Me\n"))
    assert exc.file == "course.yaml" and "unknown field 'author'" in exc.problem


def test_refuses_unknown_json_fields(tmp_path: Path) -> None:
    exc = refusal(write_json(tmp_path, json_course(titel="x")))
    assert exc.file == "course.json" and "unknown field 'titel'" in exc.problem
    data = json_course()
    data["topics"][0]["boddy"] = "x"
    exc = refusal(write_json(tmp_path, data))
    assert "topics[0] has an unknown field 'boddy'" in exc.problem


def test_refuses_json_that_is_not_an_object(tmp_path: Path) -> None:
    exc = refusal(write_json(tmp_path, [1, 2]))
    assert exc.file == "course.json" and "JSON object" in exc.problem


def test_refuses_json_topics_that_are_not_a_list_of_objects(tmp_path: Path) -> None:
    exc = refusal(write_json(tmp_path, json_course(topics={"a": 1})))
    assert exc.file == "course.json" and "'topics' must be a list" in exc.problem
    exc = refusal(write_json(tmp_path, json_course(topics=["a"])))
    assert "topics[0] must be an object" in exc.problem


# --- refusals: topics as a whole -------------------------------------------------------


def test_refuses_duplicate_module_position_naming_both_files(tmp_path: Path) -> None:
    root = write_course(tmp_path / "c", {
        "01-01-flour.md": topic_md(1, 1, "Flour"),
        "01-01-wheat.md": topic_md(1, 1, "Wheat"),
    })
    exc = refusal(root)
    assert exc.file == "01-01-wheat.md"
    assert "module 1, position 1 is also used by 01-01-flour.md" in exc.problem


def test_refuses_duplicate_module_position_in_json(tmp_path: Path) -> None:
    data = json_course()
    data["topics"][1]["position"] = 2
    exc = refusal(write_json(tmp_path, data))
    assert exc.file == "course.json"
    assert "topics[1] ('flour')" in exc.problem and "topics[0] ('salt')" in exc.problem


def test_refuses_duplicate_topic_key_naming_both_files(tmp_path: Path) -> None:
    root = write_course(tmp_path / "c", {
        "a/flour.md": topic_md(1, 1, "Flour"),
        "b/flour.md": topic_md(1, 2, "More flour"),
    })
    exc = refusal(root)
    assert exc.file == "b/flour.md"
    assert "topic key 'flour' is also used by a/flour.md" in exc.problem


def test_refuses_duplicate_topic_key_in_json(tmp_path: Path) -> None:
    data = json_course()
    data["topics"][1]["key"] = "salt"
    exc = refusal(write_json(tmp_path, data))
    assert exc.file == "course.json" and "topic key 'salt' is also used by topics[0]" in exc.problem


@pytest.mark.parametrize("body", ["", "   \n\t\n  "])
def test_refuses_empty_topic_body(tmp_path: Path, body: str) -> None:
    exc = refusal(one_topic_folder(tmp_path, topic_md(body=body)))
    assert exc.file == "01-01-flour.md" and "body after the front matter is empty" in exc.problem


def test_refuses_empty_topic_body_in_json(tmp_path: Path) -> None:
    data = json_course()
    data["topics"][0]["body"] = " \r\n "
    exc = refusal(write_json(tmp_path, data))
    assert exc.file == "course.json" and "topics[0] ('salt') has an empty body" in exc.problem


def test_refuses_json_course_without_topics(tmp_path: Path) -> None:
    exc = refusal(write_json(tmp_path, json_course(topics=[])))
    assert exc.file == "course.json" and "'topics' is empty" in exc.problem


def test_refuses_absurdly_nested_input(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)
    exc = refusal(path)
    assert exc.file == "deep.json" and "nested too deeply" in exc.problem


# --- the demo course ------------------------------------------------------------------


def test_demo_course_loads_with_substantial_topics() -> None:
    course = load_course(DEMO)
    assert course.key == "bread-science"
    assert len(course.modules) >= 3 and len(course.topics) >= 10
    assert {t.module for t in course.topics} == set(course.modules)
    for topic in course.topics:
        words = len(topic.body.split())
        assert words >= 250, f"{topic.source_file} has only {words} words"
        assert topic.body.count("\n## ") >= 2, f"{topic.source_file} needs sub-headings"


# --- unlock rules and pedagogy modes (rag/learners/progress.py) --------------------------------

GATED_YAML = """\
key: gated
title: Gated
unlock: sequential
mode: answer
modules:
  1: Ingredients
  2:
    title: Process
    mode: hint
  3:
    title: Baking
    requires: [1]
"""

THREE_MODULES = {
    "01-01-flour.md": topic_md(1, 1, "Flour"),
    "02-01-mixing.md": topic_md(2, 1, "Mixing"),
    "03-01-crust.md": topic_md(3, 1, "Crust"),
}


def test_unlock_rules_and_modes_load_from_yaml_and_json(tmp_path: Path) -> None:
    course = load_course(write_course(tmp_path / "c", THREE_MODULES, course_yaml=GATED_YAML))
    assert (course.unlock, course.mode) == ("sequential", "answer")
    assert course.modules == {1: "Ingredients", 2: "Process", 3: "Baking"}
    assert {n: (r.requires, r.mode) for n, r in course.module_rules.items()} == {
        2: (None, "hint"),
        3: ([1], None),
    }
    data = json_course(unlock="sequential", mode="hint",
                       modules={"1": {"title": "Ingredients", "requires": []}})
    course = load_course(write_json(tmp_path, data))
    assert (course.unlock, course.mode) == ("sequential", "hint")
    assert course.module_rules[1].requires == []
    # Absent, they default to an open course that answers.
    plain = load_course(write_course(tmp_path / "plain"))
    assert (plain.unlock, plain.mode, plain.module_rules) == ("open", "answer", {})


@pytest.mark.parametrize(
    ("yaml_text", "problem"),
    [
        ("unlock: gradual\n", "the course field 'unlock' must be 'open' or 'sequential', "
                              "not the string 'gradual'"),
        ("mode: quiz\n", "the course field 'mode' must be 'answer' or 'hint', not the string "
                         "'quiz'"),
        ("modules:\n  1: A\n  2: {title: B, requires: [4]}\n",
         "the course module 2 requires module 4, which 'modules' does not list"),
        ("modules:\n  1: A\n  2: {title: B, requires: [2]}\n",
         "the course 'modules' entry 2 requires itself: list the modules before it"),
        ("modules:\n  1: {title: A, requires: [2]}\n  2: {title: B, requires: [1]}\n",
         "the course modules require each other in a circle (1 -> 2 -> 1): no learner "
         "could ever unlock them"),
        ("modules:\n  1: {title: A, needs: [2]}\n  2: B\n",
         "the course 'modules' entry 1 has an unknown field 'needs'; allowed fields: "
         "title, requires, mode"),
        ("modules:\n  1: {title: A, requires: 2}\n  2: B\n",
         "the course 'modules' entry 1 field 'requires' must be a list of module numbers, "
         "not the number 2"),
        ("modules:\n  1: {requires: [2]}\n  2: B\n",
         "the course 'modules' entry 1 is missing the required field 'title'"),
    ],
)
def test_refuses_bad_unlock_rules(tmp_path: Path, yaml_text: str, problem: str) -> None:
    topics = {"01-01-a.md": topic_md(1, 1, "A"), "02-01-b.md": topic_md(2, 1, "B")}
    root = write_course(tmp_path / "c", topics, course_yaml=f"key: k\ntitle: T\n{yaml_text}")
    exc = refusal(root)
    assert (exc.file, exc.problem) == ("course.yaml", problem)
