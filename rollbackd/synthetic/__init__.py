"""The machinery behind :mod:`rollbackd.scenarios` (its public face): the model of a
deployment's inputs and scores, traffic shaping, fault effects, event encoding and the
chunked generator that ties them together. Nothing here is a public API."""
