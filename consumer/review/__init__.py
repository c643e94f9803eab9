"""Human review in the loop: results a person should decide, and their decisions back into the stream.

Between the classifiers and the pipeline: `items` (which results need a person, and the
self-contained review item), `state` (review items and the decision that counts for each, as
the review and decisions topics hold them), `decisions` (a decision as a corrected verdict),
`appeals` (an appeal as a review item), `loop` (the second consumer: decisions and appeals
in, corrected verdicts and review items out, committed after delivery), `desk` (what the
pipeline holds), `metrics`, `export` (decisions as labelled data for `policy eval`), `audit`
(what people did, as CSV or JSONL) and `coop` (a bridge to ROOST's Coop review console). The
contracts themselves (`ReviewItem`, `ReviewDecision` with its overturns, `ReviewNote`, `Appeal`)
live in `consumer.events`.
"""
