//! Amazon States Language (JSONPath and JSONata query languages): parsing and validation
//! ([`validate()`]), paths and payload templates ([`path`]), intrinsic functions
//! ([`intrinsics`]), JSONata expressions ([`jsonata`]), Choice rules ([`choice`]) and retry timing ([`retry`]).

pub mod choice;
pub mod definition;
pub mod error;
pub mod intrinsics;
pub mod jsonata;
pub mod path;
pub mod path_numbers;
pub mod retry;
pub mod timestamp;
pub mod validate;

pub use definition::{Kind, State, StateMachine};
pub use error::{names, StatesError};
pub use validate::{validate, validate_value, Definition, Diagnostic, InvalidDefinition, Resources, Severity};

#[cfg(test)]
mod validate_tests;
