//! Request selection algorithms (filled in by the dispatcher work).
