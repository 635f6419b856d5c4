//! health (being built).
