"""The review console: the review queue on a web page (`safeguard-consumer review console`).

For teams that review a few hundred items a day and will not run Coop: a small web application
over the review loop's topics (consumer.review). It reads review items and decisions from their
topics (feed.py), shows open reviews in queues per policy and reason, oldest first, one item at
a time to one reviewer (leases.py: a lease that expires), and writes each decision to the
decisions topic before the next item shows (writer.py); the consumer's review loop turns it
into the corrected verdict. Reviewers are named by token sign-in or by a proxy's header
(identity.py), each with a role (roles.py: moderator, lead, analyst, admin) checked on every
route; the pages, the dashboard and the audit trail are app.py, templates/ and static/; queue.py
holds what they show, including the appeals and lead (escalation) queues.

A top-level application beside the demo, below the CLI: it imports the review package and the
layers under it, and nothing imports it but the CLI.
"""
