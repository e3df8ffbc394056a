-- The staff's aggregate insight pages read summaries a worker refreshes, not the
-- events (rag/learners/insights.py): one row per (course, kind, window, key), in page
-- order by (-count, key), so a page is one index range whatever the events' volume.
CREATE TABLE insight_summaries (
    course_id   bigint NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('questions', 'gaps')),
    window_days integer NOT NULL CHECK (window_days > 0),
    neg_count   bigint NOT NULL,
    key         text NOT NULL,
    item        jsonb NOT NULL,
    PRIMARY KEY (course_id, kind, window_days, neg_count, key)
);

-- When each course's summaries were last computed, and up to when.
CREATE TABLE insight_refreshes (
    course_id    bigint PRIMARY KEY REFERENCES courses (id) ON DELETE CASCADE,
    refreshed_at timestamptz NOT NULL,
    events_until bigint NOT NULL
);
