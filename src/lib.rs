//! deskgen: a desk photo in, an improved desk-setup image and shopping links out.

pub mod inference;
