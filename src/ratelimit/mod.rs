//! Rate limits: pure algorithms with the clock passed in, and the stores that keep their state.
