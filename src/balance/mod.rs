//! balance (being built).
