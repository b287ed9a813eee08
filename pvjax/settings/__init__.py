"""Settings: configs checked whole and unpacked into typed settings at the boundary, before any
model loads or any file is written: the settings the methods share (`types`: `Sampling`,
`Judging`, `Workspace`, `VectorChoice`, ...) and extraction's (`extraction`: its checks and
`ExtractionSettings`). A study or command unpacks its config once; no method takes a config.

May import: `files`, `parallel`, `loading` (headers, for checks against a model's depth) and the
model contract; never the methods that take the settings."""
