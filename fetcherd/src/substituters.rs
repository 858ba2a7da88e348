//! (fetch helper fills this module)
