//! Forecasting.
