-- Hybrid retrieval weighs a question's words by how rare they are in the course
-- (inverse document frequency, rag/search.py): "Calvel" or "100.64.0.0/10" in one
-- chunk says more than "flour" in most of them, and ts_rank_cd has no such weight.
-- One row per course and lexeme: how many of the course's chunks hold it. Rebuilt
-- for a course at the end of every reindex run that changed it (rag/indexing.py);
-- stale figures between an import and its reindex only shift ranks a little.
CREATE TABLE course_lexemes (
    course_id bigint NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
    lexeme    text NOT NULL,
    chunks    integer NOT NULL,
    PRIMARY KEY (course_id, lexeme)
);
ALTER TABLE courses ADD COLUMN lexeme_chunks integer NOT NULL DEFAULT 0;

INSERT INTO course_lexemes (course_id, lexeme, chunks)
SELECT c.id, s.word, s.ndoc
  FROM courses c,
       LATERAL ts_stat(format('SELECT lexemes FROM course_chunks WHERE course_id = %s', c.id)) s;
UPDATE courses c
   SET lexeme_chunks = (SELECT count(*) FROM course_chunks k WHERE k.course_id = c.id);
