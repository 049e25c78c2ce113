"""validate-port's engine on the reference layer library: each Caffe layer of the user's net
judged on the port's own inputs (locally), or inside the smallest segment the port's returned
blobs allow, forward and backward, with the port run as users run it (eval(), twice).

Modules: ``net`` (the net as the reference reads it, and its segments), ``refport`` (the
reference as a port), ``engine`` (one example: Caffe, the port, every check), ``report``
(the verdicts and their text).
"""

from __future__ import annotations
