"""What eval/ (quality) and bench/ (speed) share, so that neither imports the other: datasets and
chunk text (``data``), the variants a run compares (``variants``), the engine under test and the
loop over questions (``runner``), answers against gold answers (``answers``), summaries
(``stats``), timing (``timing``) and a report's settings (``report``)."""
