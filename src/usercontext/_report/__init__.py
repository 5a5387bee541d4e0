"""
The validation report behind ``usercontext report``.

``import usercontext`` never imports it; the command imports the modules it
needs when it runs. The modules import one way, from the sections down:

- `usercontext._report.sections`: the sections, in order, as a plain tuple;
- one module per section: `usercontext._report.contexts`,
  `usercontext._report.engines`, `usercontext._report.db`,
  `usercontext._report.events` and `usercontext._report.http` (which drives
  the example service of `usercontext._report.service`);
- `usercontext._report.floors`: the floors the sections compare against, which
  ``benchmarks/`` imports too;
- `usercontext._report.memory` and `usercontext._report.stability`: the
  sections of memory and leak cycles, and of throughput and stability, which
  drive the same example service;
- `usercontext._report.frame`: sections, progress, and the report as Markdown
  and JSON;
- `usercontext._report.output` and `usercontext._report.charts`: the files of
  ``--out`` (Markdown, JSON, and HTML with charts drawn by pygal, the
  ``report`` extra);
- `usercontext._report.timing`: interleaved comparisons, percentiles and
  formatting;
- `usercontext._report.scale` and `usercontext._report.rows`: how much work a
  run does, and the rows, their kinds and the verdict.
"""
