"""Settings: configs checked whole and unpacked into typed settings at the boundary, before any
model loads or any file is written (`extraction`).

May import: `files`, `parallel`, `loading` (headers, for checks against a model's depth) and the
model contract; never the methods that take the settings."""
