//go:build tools

// Package tools pins helm; tools/build.sh builds helm.sh/helm/v3/cmd/helm by path.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
