//! libkrg.so
