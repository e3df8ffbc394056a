"""A topic's text rendered for readers: no raw HTML, no script, headings anchored as
citations name them."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag.answering.prompts import anchor
from rag.content.chunking import chunk_topic
from rag.content.courses import load_course
from rag.content.topic_text import render

DEMO = Path(__file__).resolve().parents[2] / "courses"

HOSTILE = """Intro with <b>bold</b> and <img src=x onerror="alert(1)">.

<script>alert("course")</script>

<div style="position:fixed;inset:0">cover the page</div>

[a link](javascript:alert(1)) [data](data:text/html;base64,PHNjcmlwdD4=) [fine](https://example.org/x)

![a tracking pixel](https://tracker.example/p.png)

## Section <em>one</em>

| port | use |
|---|---|
| 443 | HTTPS |

```
<script>in code</script>
```
"""


def test_raw_html_and_script_in_a_course_come_out_as_text() -> None:
    html, _ = render(HOSTILE)
    assert "<script" not in html and "<img" not in html and "<div" not in html
    assert "<b>" not in html and "<em>" not in html
    assert "&lt;script&gt;alert(&quot;course&quot;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "&lt;script&gt;in code&lt;/script&gt;" in html
    # Link targets that run or carry code are not links; a web link is.
    assert "javascript:" not in html.replace("[a link](javascript:alert(1))", "")
    assert 'href="data:' not in html
    assert '<a href="https://example.org/x">fine</a>' in html
    # Images are off: the pixel is at most a link a reader may follow, never fetched.
    assert '!<a href="https://tracker.example/p.png">a tracking pixel</a>' in html
    assert "<table>" in html and "<td>443</td>" in html


def test_headings_carry_the_anchor_a_citation_names_and_repeats_are_numbered() -> None:
    html, headings = render("# Salt\n\n## How much salt\n\ntext\n\n## How much salt\n\nmore")
    assert [(h.level, h.text, h.anchor) for h in headings] == [
        (1, "Salt", "salt"),
        (2, "How much salt", "how-much-salt"),
        (2, "How much salt", "how-much-salt-2"),
    ]
    assert '<h2 id="how-much-salt" data-anchor="how-much-salt">How much salt</h2>' in html
    assert 'id="how-much-salt-2"' in html


@pytest.mark.parametrize("course", ["demo", "networking"])
def test_every_citation_anchor_of_the_shipped_courses_is_a_heading_of_its_topic(
    course: str,
) -> None:
    """A citation's anchor is the slug of its chunk's innermost heading
    (rag/answering/prompts.py): the rendered topic has a heading with that id."""
    loaded = load_course(DEMO / course)
    checked = 0
    for topic in loaded.topics:
        _, headings = render(topic.body)
        anchors = {h.anchor for h in headings}
        chunks = chunk_topic(topic.body, title=topic.title, target_tokens=200, overlap_tokens=0)
        for chunk in chunks:
            if chunk.heading_path:
                assert anchor(chunk.heading_path[-1]) in anchors, (topic.key, chunk.heading_path)
                checked += 1
    assert checked > 20
