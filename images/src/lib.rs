//! vloop images.
