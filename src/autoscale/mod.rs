//! Autoscaler: the HPA decision as pure math (`policy`) and, later, the providers that act on it.
