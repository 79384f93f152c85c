//! Helpers for the multi-process tests.
