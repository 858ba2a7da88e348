//! The one prepare pipeline (being written by the lead: resolve → closure → view → lease).
