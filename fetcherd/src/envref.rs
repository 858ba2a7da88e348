//! (floxhub helper fills this module)
