//! Discovery (API.md §7).
