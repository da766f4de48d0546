"""The parts of the rules-file loader, one module per section of the file.

``rollbackd.rules.loader`` is the public entry; this package is how it reads a file:

- ``reader``: :class:`~rollbackd.rules.loading.reader.NodeReader`, the primitives every section
  uses (mapping, list, string, number, duration, ...) and the issues found so far;
- ``document``: the YAML document and its top-level keys, in file order;
- ``settings``, ``grouping``, ``deployments`` (with ``backends``), ``rules`` (with ``timing`` and
  ``detector_check``), ``inhibit``: one reader per section, each given the shared ``NodeReader``;
- ``summary``: what ``rollbackd validate`` prints for a valid file.
"""
